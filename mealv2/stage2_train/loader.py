"""The training loader: a declared pipeline from an epoch number to batches on the device.

    epoch e --> labels.for_epoch(e): which crops each image gets and what their targets are
            --> epoch_order: this rank's images per step (permutation of (seed, e), padded)
            --> CropRequest per step --> iterate_crops (DALI: one decode per image, C crops,
                every view rendered; or iterate_crops_torch) --> Batch(views, target)

Three label sources share the rest of the pipeline: :class:`StoredLabels` replays a label
round (boxes, flips and top-k from the store), :class:`FreshLabels` draws new boxes each
epoch with the stage-1 sampler and gives the dataset labels (``--hard-labels``) or no
target (online mode: the trainer runs the teachers on the rendered teacher views).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..common.crop_loader import CropRequest, View, iterate_crops, iterate_crops_torch
from ..common.crops import CropParams, sample_crops
from ..common.dataset import DatasetIndex
from ..common.errors import MealV2Error
from ..common.store import LabelStore, RoundData, StoreError
from ..common.targets import reconstruct_targets


@dataclass
class Batch:
    views: list[torch.Tensor]     # per view (n, 3, res, res) on the device, n = images x C; [0] is the student's
    target: torch.Tensor | None   # (n, K) float soft targets, (n,) int64 class ids, or None (online)

    @property
    def images(self) -> torch.Tensor:
        return self.views[0]


@dataclass
class ReplayedRound:
    """An epoch of stored labels: the round's arrays, in RAM."""

    data: RoundData
    num_classes: int

    def crops(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.data.boxes[ids], self.data.flips[ids].astype(bool)

    def targets(self, ids: np.ndarray, device: torch.device) -> torch.Tensor:
        top_ids = torch.from_numpy(self.data.ids[ids].astype(np.int64)).to(device, non_blocking=True)
        codes = torch.from_numpy(self.data.probs[ids]).to(device, non_blocking=True)
        return reconstruct_targets(top_ids.flatten(0, 1), codes.flatten(0, 1), self.num_classes)


@dataclass
class FreshCrops:
    """An epoch of new random crops (sampler round = epoch) with dataset labels or no target."""

    seed: int
    epoch: int
    sizes: np.ndarray
    crops_per_image: int
    params: CropParams
    labels: np.ndarray | None   # None: online mode

    def crops(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return sample_crops(self.seed, self.epoch, ids, self.sizes[ids], self.crops_per_image, self.params)

    def targets(self, ids: np.ndarray, device: torch.device) -> torch.Tensor | None:
        if self.labels is None:
            return None
        return torch.from_numpy(np.repeat(self.labels[ids], self.crops_per_image)).to(device, non_blocking=True)


class StoredLabels:
    """Epoch e replays round e mod R, read into RAM in one slab; one round is held at a time."""

    def __init__(self, store: LabelStore):
        self.store = store
        self.rounds = store.rounds_planned
        self.crops_per_image = store.attrs["crops_per_image"]
        self.num_classes = len(store.attrs["classes"])
        self._current: tuple[int, ReplayedRound] | None = None

    def for_epoch(self, epoch: int) -> ReplayedRound:
        r = epoch % self.rounds
        if self._current is None or self._current[0] != r:
            self._current = None  # release the previous round before reading the next
            self._current = (r, ReplayedRound(self._read(r), self.num_classes))
        return self._current[1]

    def _read(self, r: int) -> RoundData:
        try:
            return self.store.read_round(r)
        except StoreError:
            raise
        except Exception as e:  # zarr reports a checksum mismatch or a bad codec stream this way
            raise MealV2Error(f"{self.store.path}: round {r} cannot be read ({type(e).__name__}: {e}); "
                              f"the store is damaged: `mealv2 verify {self.store.path}` lists the bad "
                              f"chunks, re-label them with the store's `mealv2 label` command") from e


@dataclass
class FreshLabels:
    """New boxes every epoch from the stage-1 sampler; ``labels`` None for online mode."""

    seed: int
    sizes: np.ndarray
    crops_per_image: int
    params: CropParams
    labels: np.ndarray | None

    def for_epoch(self, epoch: int) -> FreshCrops:
        return FreshCrops(self.seed, epoch, self.sizes, self.crops_per_image, self.params, self.labels)


def epoch_order(num_images: int, images_per_step: int, seed: int, epoch: int, rank: int = 0,
                world_size: int = 1) -> np.ndarray:
    """(steps, images_per_step) image ids of one rank for one epoch.

    A permutation drawn from (seed, epoch) alone, so a resumed run sees the same order. It is
    padded by wrapping around (as torch's DistributedSampler does) to whole steps on every
    rank: all ranks take the same number of full steps and every image is seen each epoch.
    """
    per_step = images_per_step * world_size
    steps = -(-num_images // per_step)
    order = np.resize(np.random.default_rng([seed, epoch]).permutation(num_images), steps * per_step)
    return order.reshape(steps, world_size, images_per_step)[:, rank]


class TrainLoader:
    """Batches of one epoch: ``for batch in loader(epoch)``; ``len(loader)`` steps per epoch."""

    def __init__(self, index: DatasetIndex, labels: StoredLabels | FreshLabels, views: list[View],
                 images_per_step: int, seed: int, device: torch.device, backend: str = "dali",
                 workers: int = 4, prefetch: int = 2, rank: int = 0, world_size: int = 1):
        self.index, self.labels, self.views = index, labels, views
        self.crops_per_image = labels.crops_per_image
        self.images_per_step, self.seed, self.device = images_per_step, seed, device
        self.backend, self.workers, self.prefetch = backend, workers, prefetch
        self.rank, self.world_size = rank, world_size

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.index), self.images_per_step, self.seed, epoch, self.rank, self.world_size)

    def __len__(self) -> int:
        return -(-len(self.index) // (self.images_per_step * self.world_size))

    def __call__(self, epoch: int) -> Iterator[Batch]:
        source = self.labels.for_epoch(epoch)
        requests = (CropRequest(ids, *source.crops(ids)) for ids in self.order(epoch))
        render = iterate_crops if self.backend == "dali" else iterate_crops_torch
        for crops in render(self.index, requests, self.views, self.crops_per_image, batch_size=self.images_per_step,
                            device=self.device.type, threads=self.workers, prefetch=self.prefetch):
            yield Batch(views=[v.to(self.device, non_blocking=True) for v in crops.views],
                        target=source.targets(crops.ids, self.device))
