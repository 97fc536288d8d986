"""The training loader: a declared pipeline from a range of steps to batches on the device.

    steps [a, b) --> step t is step t mod P of pass t // P (P steps per pass)
                 --> labels.for_pass(p): which crops each image gets and their targets
                 --> epoch_order(p): this rank's images per step (permutation of (seed, p), padded)
                 --> CropRequest per step --> iterate_crops (DALI: one decode per image, C crops,
                     every view rendered; or the torch loader) --> Batch(views, target[, labels])

Epochs count N crops (N images), as MEAL V2 and FKD count them: a pass over the images with
C crops each is C epochs. An epoch is ``round(N / crops per step)`` steps (at least one) of
the stream of passes, which run back to back: an epoch may end mid-pass, and the next epoch
continues that pass (same permutation, same label round). Everything is a pure function of
(seed, pass, step), so any epoch starts exactly where the previous one stopped, in this run or
after ``--resume``.

Three label sources share the rest of the pipeline: :class:`StoredLabels` replays a label
round (boxes, flips and top-k from the store; pass p replays round p mod R), :class:`FreshLabels`
draws new boxes each pass with the stage-1 sampler and gives the dataset labels
(``--hard-labels``) or no target (online mode: the trainer runs the teachers on the rendered
teacher views). A step's targets are cut from its pass's labels when its request is made, so
only one label round is held in RAM even while DALI prefetches across a pass boundary. Asked for
(``labels``: the images' class ids), every batch also carries its crops' dataset labels beside
the soft targets, for a loss that weighs them in (``--hard-label-weight``).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..common.data.loaders.base import CropRequest, View
from ..common.data.crops import CropParams, sample_crops
from ..common.data.dataset import DatasetError, DatasetIndex
from ..common.errors import MealV2Error
from ..common.data.loaders.registry import iterate, resolve
from ..common.store.label_store import LabelStore, RoundData, StoreError
from ..common.data.targets import mixed_targets, reconstruct_targets


@dataclass
class Batch:
    views: list[torch.Tensor]     # per view (n, 3, res, res) on the device, n = images x C; [0] is the student's
    target: torch.Tensor | None   # (n, K) float soft targets, (n,) int64 class ids, or None (online)
    labels: torch.Tensor | None = None   # (n,) int64 dataset class ids beside soft targets, when asked for

    @property
    def images(self) -> torch.Tensor:
        return self.views[0]


@dataclass
class StoredTargets:
    """One step's stored top-k, compact until the batch is yielded: the ensemble's, or with ``weights`` the
    per-teacher layers' (``layers``: the used layers' (ids, codes), ``weights`` theirs)."""

    top_ids: np.ndarray    # (b, C, k)
    codes: np.ndarray      # (b, C, k + 1)
    num_classes: int
    layers: list[tuple[np.ndarray, np.ndarray]] | None = None
    weights: list[float] | None = None

    def to(self, device: torch.device) -> torch.Tensor:
        if self.weights is not None:
            return mixed_targets([_on(device, *layer) for layer in self.layers], self.weights, self.num_classes)
        return reconstruct_targets(*_on(device, self.top_ids, self.codes), self.num_classes)


def _on(device: torch.device, top_ids: np.ndarray, codes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, C, ...) stored ids and codes as (b * C, ...) tensors on ``device``."""
    return (torch.from_numpy(top_ids.astype(np.int64)).flatten(0, 1).to(device, non_blocking=True),
            torch.from_numpy(codes).flatten(0, 1).to(device, non_blocking=True))


@dataclass
class HardTargets:
    labels: np.ndarray     # (b * C,)

    def to(self, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(self.labels).to(device, non_blocking=True)


def crop_labels(labels: np.ndarray, ids: np.ndarray, crops_per_image: int) -> HardTargets:
    """The class ids of images ``ids``' crops, in batch order (each image's C crops in a row)."""
    return HardTargets(np.repeat(labels[ids], crops_per_image))


@dataclass
class ReplayedRound:
    """A pass of stored labels: the round's arrays, in RAM."""

    data: RoundData
    num_classes: int
    weights: dict[int, float] | None = None   # layer: its weight (the nonzero ones), None: the ensemble

    def crops(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.data.boxes[ids], self.data.flips[ids].astype(bool)

    def targets(self, ids: np.ndarray) -> StoredTargets:
        if self.weights is None:
            return StoredTargets(self.data.ids[ids], self.data.probs[ids], self.num_classes)
        return StoredTargets(self.data.ids[ids], self.data.probs[ids], self.num_classes,
                             [tuple(a[ids] for a in self.data.layers[j]) for j in self.weights],
                             list(self.weights.values()))


@dataclass
class FreshCrops:
    """A pass of new random crops (sampler round = pass) with dataset labels or no target."""

    seed: int
    pass_: int
    sizes: np.ndarray
    crops_per_image: int
    params: CropParams
    labels: np.ndarray | None   # None: online mode

    def crops(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return sample_crops(self.seed, self.pass_, ids, self.sizes[ids], self.crops_per_image, self.params)

    def targets(self, ids: np.ndarray) -> HardTargets | None:
        return None if self.labels is None else crop_labels(self.labels, ids, self.crops_per_image)


class StoredLabels:
    """Pass p replays round p mod R, read into RAM in one slab; one round is held at a time. ``weights`` (layer:
    weight, the nonzero ones; :func:`~.replay.layer_weights`): targets from those per-teacher layers, not the
    ensemble's."""

    def __init__(self, store: LabelStore, weights: dict[int, float] | None = None):
        self.store, self.weights = store, weights
        self.rounds = store.rounds_planned
        self.crops_per_image = store.attrs["crops_per_image"]
        self.num_classes = len(store.attrs["classes"])
        self._current: tuple[int, ReplayedRound] | None = None

    def for_pass(self, pass_: int) -> ReplayedRound:
        r = pass_ % self.rounds
        if self._current is None or self._current[0] != r:
            self._current = None  # release the previous round before reading the next
            self._current = (r, ReplayedRound(self._read(r), self.num_classes, self.weights))
        return self._current[1]

    def _read(self, r: int) -> RoundData:
        try:
            return self.store.read_round(r, layers=list(self.weights or ()))
        except StoreError:
            raise
        except Exception as e:  # zarr reports a checksum mismatch or a bad codec stream this way
            raise MealV2Error(f"{self.store.path}: round {r} cannot be read ({type(e).__name__}: {e}); "
                              f"the store is damaged: `mealv2 verify {self.store.path}` lists the bad "
                              f"chunks, re-label them with the store's `mealv2 label` command") from e


@dataclass
class FreshLabels:
    """New boxes every pass from the stage-1 sampler; ``labels`` None for online mode."""

    seed: int
    sizes: np.ndarray
    crops_per_image: int
    params: CropParams
    labels: np.ndarray | None

    def for_pass(self, pass_: int) -> FreshCrops:
        return FreshCrops(self.seed, pass_, self.sizes, self.crops_per_image, self.params, self.labels)


def epoch_order(num_images: int, images_per_step: int, seed: int, pass_: int, rank: int = 0,
                world_size: int = 1) -> np.ndarray:
    """(steps, images_per_step) image ids of one rank for one pass.

    A permutation drawn from (seed, pass) alone, so a resumed run sees the same order. It is
    padded by wrapping around (as torch's DistributedSampler does) to whole steps on every
    rank: all ranks take the same number of full steps and every image is seen each pass.
    """
    per_step = images_per_step * world_size
    steps = -(-num_images // per_step)
    order = np.resize(np.random.default_rng([seed, pass_]).permutation(num_images), steps * per_step)
    return order.reshape(steps, world_size, images_per_step)[:, rank]


def steps_per_epoch(num_images: int, crops_per_step: int) -> int:
    """Steps of one epoch of N crops at ``crops_per_step`` crops per step over all ranks (>= 1)."""
    return max(1, round(num_images / crops_per_step))


def steps_per_pass(num_images: int, images_per_step: int) -> int:
    """Steps of one pass over the images at ``images_per_step`` images per step over all ranks
    (the last step wraps around, as :func:`epoch_order` pads it)."""
    return -(-num_images // images_per_step)


def images_per_step(cfg_batch: int, crops_per_image: int, world_size: int) -> int:
    """Images per step and rank for a global batch of ``cfg_batch`` crops; refuses a batch that
    does not split into whole images on every rank."""
    unit = crops_per_image * world_size
    if cfg_batch % unit:
        lo, hi = max(unit, cfg_batch // unit * unit), (cfg_batch // unit + 1) * unit
        raise MealV2Error(f"--batch-size {cfg_batch} (crops per step over all ranks) is not a multiple of "
                          f"{crops_per_image} crops per image x {world_size} rank(s) = {unit}; use "
                          f"{lo if lo == hi else f'{lo} or {hi}'}")
    return cfg_batch // unit


class TrainLoader:
    """``for batch in loader.epoch(e)``: the steps of epoch e; ``len(loader)`` steps per epoch.

    ``expected_crcs`` (the store's CRC32C of each image): a batch whose image bytes differ from
    what was labelled is refused, naming the image. ``hard_labels`` (each image's class id, in the
    targets' classes): every batch carries its crops' as ``Batch.labels``.
    """

    def __init__(self, index: DatasetIndex, labels: StoredLabels | FreshLabels, views: list[View],
                 images_per_step: int, seed: int, device: torch.device, backend: str = "auto",
                 workers: int = 4, prefetch: int = 2, rank: int = 0, world_size: int = 1,
                 expected_crcs: np.ndarray | None = None, store_path=None, hard_labels: np.ndarray | None = None):
        self.index, self.labels, self.views, self.hard_labels = index, labels, views, hard_labels
        self.crops_per_image = labels.crops_per_image
        self.images_per_step, self.seed, self.device = images_per_step, seed, device
        self.backend, self.workers, self.prefetch = resolve(backend, device.type), workers, prefetch
        self.rank, self.world_size = rank, world_size
        self.expected_crcs, self.store_path = expected_crcs, store_path
        self.steps_per_pass = steps_per_pass(len(index), images_per_step * world_size)
        self.crops_per_step = images_per_step * self.crops_per_image * world_size   # all ranks
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return steps_per_epoch(len(self.index), self.crops_per_step)

    def order(self, pass_: int) -> np.ndarray:
        if self._order is None or self._order[0] != pass_:
            self._order = (pass_, epoch_order(len(self.index), self.images_per_step, self.seed, pass_,
                                              self.rank, self.world_size))
        return self._order[1]

    def passes(self, epochs: int) -> float:
        """Passes over the images that ``epochs`` epochs take."""
        return epochs * len(self) / self.steps_per_pass

    def epoch(self, epoch: int, views: list[View] | None = None) -> Iterator[Batch]:
        return self.steps(epoch * len(self), (epoch + 1) * len(self), views)

    def steps(self, start: int, stop: int, views: list[View] | None = None) -> Iterator[Batch]:
        """Batches of the global steps [start, stop), rendered in ``views`` (default: the loader's).

        Each call builds its own pipeline, so views may change from call to call: progressive
        resizing renders each epoch's student view at that epoch's res, the boxes unchanged.
        """
        views = views or self.views
        targets: deque = deque()

        def requests():
            for t in range(start, stop):
                pass_, j = divmod(t, self.steps_per_pass)
                source = self.labels.for_pass(pass_)
                ids = self.order(pass_)[j]
                targets.append((source.targets(ids), None if self.hard_labels is None
                                else crop_labels(self.hard_labels, ids, self.crops_per_image)))
                yield CropRequest(ids, *source.crops(ids))

        for crops in iterate(self.backend, self.index, requests(), views, self.crops_per_image,
                             batch_size=self.images_per_step, device=str(self.device), threads=self.workers,
                             prefetch=self.prefetch):
            if self.expected_crcs is not None:
                self._check_unchanged(crops.ids, crops.crcs)
            target, labels = targets.popleft()
            yield Batch(views=[v.to(self.device, non_blocking=True) for v in crops.views],
                        target=None if target is None else target.to(self.device),
                        labels=None if labels is None else labels.to(self.device))

    def _check_unchanged(self, ids: np.ndarray, crcs: np.ndarray) -> None:
        expected = self.expected_crcs[ids]
        changed = np.flatnonzero(expected != crcs)
        if len(changed):
            i = int(ids[changed[0]])
            raise DatasetError(f"{self.index.path(i)}: the file changed since {self.store_path} was labelled "
                               f"(CRC32C {int(crcs[changed[0]]):08x}, the store has {int(expected[changed[0]]):08x}); "
                               f"its stored labels describe other pixels. Restore the file, or label this "
                               f"data again with `mealv2 label`")
