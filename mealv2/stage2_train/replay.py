"""Stored labels in any training loop: :class:`ReplayLoader`, and the checks every replay of a store passes.

`mealv2 train --labels` and :class:`ReplayLoader` open a store through the same functions
(:func:`open_checked_store`, :func:`data_index`, :func:`check_store_matches`), so a Python loop
is refused exactly what the command is refused: an incomplete or damaged store, other crop
settings than the store's, data with another fingerprint or other classes, and (per batch) an
image whose bytes changed since it was labelled.
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..common.config import FLAG, INT_FROM_0, MEAN, STD, Instance, OrNone, check_values, declared
from ..common.data.dataset import DatasetIndex, build_index_shared
from ..common.data.loaders.base import View
from ..common.data.loaders.registry import available_cores, resolve
from ..common.errors import MealV2Error
from ..common.models.checkpoints import data_config, preview_classes, unwrap_model
from ..common.models.distributed import DistInfo
from ..common.models.runtime import Runtime, resolve_device
from ..common.store.label_store import LabelStore, leading
from ..common.store.locations import LOCAL_PATH, StorePath
from .config import TrainConfig
from .loader import StoredLabels, TrainLoader, images_per_step
from .losses import mix_batch


def open_checked_store(path: str | Path, info: DistInfo = DistInfo(),
                       given: dict[str, tuple[str, object]] | None = None, res_flag: str = "--res", *,
                       teacher_weights=None, weights_flag: str = "--teacher-weights") -> LabelStore:
    """The store, refused unless complete and made with the crop settings ``given`` (if any), and, with
    ``teacher_weights`` (:func:`layer_weights`'; spelled ``weights_flag``), unless the layers they weigh are.

    ``given``: setting name (``scale``, ``ratio``, ``crops_per_image``) -> (how the caller spelled
    it, its value in the store's attrs form), e.g. ``{"crops_per_image": ("--crops-per-image 4", 4)}``;
    ``res_flag`` is how the caller spells the res, which may differ.
    Every round is verified, not just the first (damage found at epoch 40 would cost the epochs
    before it), at every start, a resume too (it follows a crash, when damage is likeliest), and
    cheaply: each rank checks the shards s with s % world == rank, each done mark is read once, and
    all ranks refuse together, naming the chunks."""
    store = LabelStore.open(path)  # refuses other format versions, naming both
    shards = range(info.rank, store.num_shards, info.world_size)
    done = store.done_mask(shards)
    added = set(store.added_layers())   # each under its own marks: checked where trained from
    layers = [j for j in layer_weights(store, teacher_weights, weights_flag) or () if j in added]
    found = info.gather_object((done.all(axis=1).tolist(), store.verify(shards, done, layers=layers)))
    full = np.logical_and.reduce([np.asarray(rounds, bool) for rounds, _ in found])
    if not full.all():   # counted as inspect and publish count: a round is complete once packed
        complete, labelled = store.rounds_complete(), leading(full)
        unpacked = (f" ({labelled} labelled: a run packs its rounds as it ends, and this one did not end)"
                    if labelled > complete else "")
        raise MealV2Error(f"{store.path}: only {complete}/{store.rounds_planned} label rounds are complete{unpacked}; "
                          f"finish it by re-running the `mealv2 label` command that made it (it resumes where it "
                          f"stopped)")
    problems = [p for _, rank_problems in found for p in rank_problems]
    if problems:
        raise MealV2Error(f"{store.path} is damaged or unfinished, refusing to train on it:\n  "
                          + "\n  ".join(problems[:10])
                          + f"\n`mealv2 verify {store.path}` lists every problem; the `mealv2 label` command that "
                          f"made the store (or added the layer) labels exactly those shards again:\n  "
                          + "\n  ".join(store.repair_commands(problems)))
    stored = {**store.attrs["crop"], "crops_per_image": store.attrs["crops_per_image"]}
    # The res is not among them: it is the student's, and the stored boxes are relative, so they render at any res.
    for name, (spelled, value) in (given or {}).items():
        if stored[name] != value:
            raise MealV2Error(f"{spelled} differs from the {stored[name]} that {store.path} was labelled with; "
                              f"with stored labels the crops and their soft labels come from the store, so they "
                              f"cannot change (leave it out; only {res_flag}, the student's resolution, may differ)")
    return store


def data_index(data: str | Path, store: LabelStore | None, info: DistInfo = DistInfo(), *, workers: int = 8,
               progress: bool = False) -> DatasetIndex:
    """DATA's index, leaving out unreadable files where the store's labelling left them out (``--skip-bad``)."""
    skip_bad = bool(store and store.attrs["dataset"]["skipped"])
    return build_index_shared(data, info, skip_bad=skip_bad, workers=max(workers, 8), progress=progress)


def check_store_matches(store: LabelStore, index, data: str) -> tuple[tuple[str, ...], str | None]:
    """The classes to train on, the store's, and a line saying so where they are not DATA's: the
    teachers' when DATA has no labels or fewer classes (the fingerprint ties the store to DATA)."""
    a = store.attrs
    classes, note = tuple(a["classes"]), None
    if not index.labelled:
        note = f"classes: DATA has no labels; the student learns the store's {len(classes)} (the teachers')"
    elif set(index.classes) < set(classes):
        note = (f"classes: the student learns the store's {len(classes)} (the teachers'); DATA's "
                f"{len(index.classes)} are among them")
    elif list(classes) != list(index.classes):
        raise MealV2Error(f"{store.path} has {len(a['classes'])} classes {preview_classes(a['classes'])}, DATA {data} has "
                          f"{len(index.classes)} classes {preview_classes(index.classes)}")
    if a["dataset"]["fingerprint"] != index.fingerprint:
        raise MealV2Error(f"{store.path} was labelled from a dataset with fingerprint "
                          f"{a['dataset']['fingerprint'][:16]} ({a['dataset']['num_images']} images), DATA {data} "
                          f"has fingerprint {index.fingerprint[:16]} ({len(index)} images); train on the data "
                          f"the store was made from, or label this data with `mealv2 label`\n  "
                          + store.dataset_changes(index.relpaths))
    return classes, note


def layer_weights(store: LabelStore, weights, flag: str = "--teacher-weights") -> dict[int, float] | None:
    """``weights`` (one per per-teacher layer, in the store's layer order; layers past them weigh 0, so a run
    resumes unchanged after a layer was added) as {layer: weight} of the nonzero ones; None (the ensemble's
    labels) for None. Refused for a store without layers, or more weights than it has layers."""
    if weights is None:
        return None
    shown = ",".join(f"{w:g}" for w in weights)
    layers = store.layers
    if not layers:
        raise MealV2Error(f"{flag} {shown}: {store.path} has no per-teacher layers, only its ensemble's labels; label "
                          f"the data with `mealv2 label ... --keep-teachers` to keep each teacher's own, or drop "
                          f"{flag} to train from the ensemble")
    if len(weights) > len(layers):
        names = ", ".join(f"{j + 1}. {layer['teacher']['spec']}" for j, layer in enumerate(layers))
        raise MealV2Error(f"{flag} {shown}: {len(weights)} weights, {store.path} has {len(layers)} per-teacher "
                          f"layers ({names}); give at most one weight per layer, in that order")
    return {j: float(w) for j, w in enumerate(weights) if w}


def store_hard_labels(store: LabelStore, asked: str) -> np.ndarray:
    """Each image's class id in the store's classes, which the store records from the dataset it
    was labelled from; refused for a store of unlabelled images (``asked``: what wants them)."""
    labels = store.labels()
    if (labels < 0).any():
        raise MealV2Error(f"{asked}: {store.path} was labelled from images without labels (a folder of loose "
                          f"images or a CSV without a 'label' column), so there are no hard labels to weigh in; "
                          f"train on its soft targets alone (drop it), or label the images as an ImageFolder "
                          f"or a CSV with a 'label' column")
    return labels.astype(np.int64)


def check_student_res(model: nn.Module, resolutions, runtime: Runtime, *, where: str, fix: str) -> None:
    """Refuse a resolution the student cannot take (a model built for one input size, like timm's
    ViTs without dynamic_img_size) before any step, naming it, rather than failing mid-run.
    ``where`` names the model, ``fix`` the settings that set the res."""
    was_training = model.training
    model.eval()
    try:
        for res in sorted(set(resolutions)):
            try:
                with torch.no_grad():
                    model(runtime.input(torch.zeros(1, 3, res, res)))
            except Exception as e:   # timm says it with an AssertionError or a shape RuntimeError
                built = data_config(model)
                raise MealV2Error(f"{where} cannot take the student's {res} px input ({type(e).__name__}: {e}); "
                                  f"train it at {f'the {built[0]} px it was built for' if built else 'a res it takes'} "
                                  f"({fix}), or pick a student that takes any input size") from e
    finally:
        model.train(was_training)


def store_classes(store: str | Path) -> tuple[str, ...]:
    """The class names a store's soft targets are over, in target order (the student's head).

    Args:
        store: a label store made by ``mealv2 label``.

    Example::

        model = timm.create_model("resnet50", num_classes=len(mealv2.store_classes("labels.zarr")))
    """
    return tuple(LabelStore.open(store).attrs["classes"])


class ReplayLoader:
    """A store's random crops and soft targets, step by step, as ``mealv2 train --labels`` replays them.

    Opening it runs every check ``mealv2 train`` runs (the store complete and undamaged, crop
    settings equal to the store's, DATA's fingerprint and classes the store's); every batch is
    refused if an image's bytes changed since it was labelled (CRC32C). Under ``torchrun`` (a
    ``torch.distributed`` group initialised, by torchrun or ``mp.spawn``) each rank gets its share
    of every step. An epoch is N crops (N images), as ``mealv2 train`` counts it; iterating yields
    the rest of the current epoch from :attr:`step` on, so ``for epoch in range(loader.epoch,
    epochs): for images, targets in loader:`` trains, and resumes mid-epoch after
    :meth:`load_state_dict`. With ``hard_labels=True`` it yields ``(images, targets, labels)``, the
    crops' dataset labels for ``MealV2Loss(hard_label_weight=A)``.

    A batch handed out is a step taken, and :meth:`state_dict` counts it (a checkpoint saved in the
    loop resumes after the batch just trained): ``next(iter(loader))`` to peek takes the first step.
    To peek without taking it: ``state = loader.state_dict(); batch = next(iter(loader));
    loader.load_state_dict(state)``. One iterator at a time: ``iter(loader)`` (and
    :meth:`load_state_dict`) is refused while another can still yield, as two would replay the same
    steps; a ``for`` loop's ends with the loop, a peek's at once, another on ``del`` or ``.close()``.

    Args:
        store: the label store (``mealv2 label -o STORE``).
        data: the dataset it was labelled from (an image folder or a CSV), byte for byte.
        batch_size: crops per step over all ranks (``--batch-size``); a multiple of the store's
            crops per image x the world size.
        model: the student (its outputs must be the store's classes); its timm data config gives
            the default ``mean``/``std``. It may be wrapped (DDP, ``nn.DataParallel``,
            ``torch.compile``, any nesting): the model inside is read. A model without a timm data
            config needs ``mean`` and ``std``.
        res: the student's resolution in px; default the store's. May be changed between epochs
            (progressive resizing): the boxes are relative.
        mean, std: normalisation of the rendered crops, three finite numbers each (std > 0);
            default the model's. One of ``model`` or ``mean``/``std`` is required.
        teacher_weights: train from the store's per-teacher layers (``mealv2 label --keep-teachers``) averaged
            with these weights (one per layer, in the store's layer order; layers past them weigh 0), as
            ``--teacher-weights``; default None, the stored ensemble.
        seed: the pass order's seed (``--seed``).
        device: ``auto``, ``cpu``, ``cuda`` or a torch.device; in a process group ``auto`` and
            ``cuda`` take the rank's GPU: ``LOCAL_RANK`` (torchrun), else the group rank modulo
            the visible GPUs (``mp.spawn``).
        loader: the crop loader backend (``auto``, ``dali``, ``torch``, ``torch-cpu``).
        workers: decoding threads per rank; default the cores this process may use.
        crops_per_image, scale, ratio: when given, refused unless equal to the store's.
        hard_labels: also yield each crop's class id (the labels of the dataset the store was
            labelled from, which it records; refused for a store of unlabelled images).

    Every argument is checked when the loader is built, as ``TrainConfig`` checks the flag of the
    same name, and refused in its words (``ReplayLoader: batch_size = 0 is out of range; ...``).

    Attributes: ``step`` (global steps taken), ``epoch``, ``classes``/``num_classes``, ``temperature``
    and ``topk`` (for :class:`MealV2Loss`), ``device``, ``crops_per_image``, ``notes`` (what
    ``mealv2 train`` would print about the classes, e.g. when DATA has no labels).

    Example::

        model = timm.create_model("resnet50", num_classes=len(mealv2.store_classes("labels.zarr")))
        loader = mealv2.ReplayLoader("labels.zarr", "imagenet/train", batch_size=512, model=model)
        for images, targets in loader:      # one epoch: (n, 3, res, res) and (n, classes) on the device
            ...
    """

    def __init__(self, store: str | Path, data: str | Path, *, batch_size: int, model: nn.Module | None = None,
                 res: int | None = None, mean=None, std=None, seed: int = 0, device: str | torch.device = "auto",
                 loader: str = "auto", workers: int | None = None, crops_per_image: int | None = None,
                 scale: tuple[float, float] | None = None, ratio: tuple[float, float] | None = None,
                 hard_labels: bool = False, teacher_weights=None):
        # The arguments that are `mealv2 train` flags are checked by TrainConfig's declarations, in its words.
        as_flags = {"batch_size": batch_size, "res": res, "seed": seed, "loader": loader,
                    "crops_per_image": crops_per_image, "scale": scale, "ratio": ratio,
                    **({} if isinstance(device, torch.device) else {"device": device})}
        check_values("ReplayLoader", {
            "store": (StorePath(), store), "data": (LOCAL_PATH, data), "model": (OrNone(Instance(nn.Module)), model),
            **{name: (declared(TrainConfig, name), value) for name, value in as_flags.items()},
            "workers": (OrNone(declared(TrainConfig, "workers")), workers), "mean": (OrNone(MEAN), mean),
            "std": (OrNone(STD), std), "hard_labels": (FLAG, hard_labels),
            "teacher_weights": (declared(TrainConfig, "teacher_weights"), teacher_weights)})
        resolve(loader)   # a backend that is not installed is refused before the store is verified
        inner = None if model is None else unwrap_model(model)   # DDP, DataParallel, torch.compile hide its config
        if inner is not None and (mean is None or std is None):
            config = data_config(inner)
            if config is None:
                raise MealV2Error(f"ReplayLoader: the model ({type(inner).__name__}) has no timm data config "
                                  f"(pretrained_cfg) to take the crops' normalisation from; pass mean= and std= "
                                  f"(e.g. ImageNet's (0.485, 0.456, 0.406) and (0.229, 0.224, 0.225))")
            mean, std = config[1] if mean is None else mean, config[2] if std is None else std
        if mean is None or std is None:
            raise MealV2Error("ReplayLoader: the crops' normalisation is unknown; pass model= (the student: its timm "
                              "data config gives mean and std) or mean= and std=")
        info = DistInfo.current()
        self.rank, self.world_size = info.rank, info.world_size
        self.device = device if isinstance(device, torch.device) else resolve_device(device, info.local_rank)
        given = {name: (f"{name}={value!r}", list(value) if isinstance(value, tuple) else value)
                 for name, value in (("crops_per_image", crops_per_image), ("scale", scale), ("ratio", ratio))
                 if value is not None}
        workers = available_cores() if workers is None else workers
        self.store = open_checked_store(store, info, given, res_flag="res=", teacher_weights=teacher_weights,
                                        weights_flag="teacher_weights=")
        self.index = data_index(data, self.store, info, workers=workers)
        self.classes, note = check_store_matches(self.store, self.index, str(data))
        self.notes = [note] if note else []
        heads = getattr(inner, "num_classes", len(self.classes))
        if heads != len(self.classes):
            raise MealV2Error(f"ReplayLoader: the model has {heads} outputs, {self.store.path}'s targets "
                              f"{len(self.classes)} classes {preview_classes(self.classes)}; create it with "
                              f"num_classes=len(mealv2.store_classes(store))")
        self.res = int(self.store.attrs["crop"]["res"]) if res is None else res
        if inner is not None:
            check_student_res(inner, [self.res], Runtime(next(inner.parameters()).device),
                              where="ReplayLoader: the model", fix="res=")
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.seed, self.batch_size = seed, batch_size
        self.teacher_weights = None if teacher_weights is None else [float(w) for w in teacher_weights]
        labels = StoredLabels(self.store, layer_weights(self.store, teacher_weights, "teacher_weights="))
        self.crops_per_image = labels.crops_per_image
        self._loader = TrainLoader(self.index, labels, [], images_per_step(batch_size, self.crops_per_image,
                                                                          info.world_size),
                                   seed, self.device, backend=loader, workers=workers, rank=info.rank,
                                   world_size=info.world_size, expected_crcs=self.store.crcs(),
                                   store_path=self.store.path,
                                   hard_labels=store_hard_labels(self.store, "ReplayLoader(hard_labels=True)")
                                   if hard_labels else None)
        self.step = 0    # global steps taken (batches yielded) since the first epoch began
        self._live: weakref.ref | None = None   # the iterator handed out last, while it may yield

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def temperature(self) -> float:
        """The softmax temperature of the stored targets (for :class:`MealV2Loss`)."""
        return float(self.store.attrs["temperature"])

    @property
    def topk(self) -> int:
        """The store's k: targets keep their top k classes exactly (for :class:`MealV2Loss`)."""
        return int(self.store.attrs["topk"])

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self.step // len(self)

    def __len__(self) -> int:
        """Steps per epoch of N crops."""
        return len(self._loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """The rest of the current epoch, from :attr:`step` on; refused while another iterator of this
        loader can still yield (both would replay the same steps)."""
        self._refuse_live("iterate it again")
        batches = self._batches()
        self._live = weakref.ref(batches)
        return batches

    def _batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        stop = (self.epoch + 1) * len(self)
        for batch in self._loader.steps(self.step, stop, [View(self.res, self.mean, self.std)]):
            self.step += 1
            yield (batch.images, batch.target) if batch.labels is None else (batch.images, batch.target, batch.labels)

    def _refuse_live(self, what: str) -> None:
        """Refuse ``what`` while an iterator handed out can still yield: one not yet exhausted, closed or
        dropped (a ``for`` loop's is dropped when the loop ends, a peek's at once)."""
        live = self._live() if self._live is not None else None
        if live is not None and live.gi_frame is not None:
            raise MealV2Error(f"ReplayLoader: cannot {what} while an iterator over it is live (at step {self.step}); "
                              f"one iterator at a time: exhaust it, or drop it (del it, or it.close()) first")

    def mix(self, images: torch.Tensor, *targets: torch.Tensor, cutmix_alpha: float = 0.0,
            cutmix_prob: float = 1.0, mixup_alpha: float = 0.0) -> tuple[torch.Tensor, ...]:
        """:func:`mix_batch` of the batch just yielded, drawn as ``mealv2 train`` draws it (from the
        seed, the step and the rank; each crop paired with the same crop of another image).
        Returns ``(images, *targets)`` mixed: pass the hard labels too to mix them by the same
        draw (they become mixed one-hot rows, as ``mealv2 train`` mixes them).

        Args:
            images, targets: the batch the loader just yielded (the soft targets, and the labels
                with ``hard_labels=True``).
            cutmix_alpha: CutMix's Beta(alpha, alpha) (``--w-cutmix`` takes 1.0); 0 turns it off.
            cutmix_prob: the probability of CutMix at a step (else mixup, if on).
            mixup_alpha: mixup's Beta(alpha, alpha) (``--mixup``); 0 turns it off.

        Example::

            images, targets = loader.mix(images, targets, cutmix_alpha=1.0)
        """
        return mix_batch(images, *targets, seed=self.seed, step=self.step - 1, rank=self.rank,
                         shift=self.crops_per_image, cutmix_alpha=cutmix_alpha, cutmix_prob=cutmix_prob,
                         mixup_alpha=mixup_alpha, num_classes=self.num_classes)

    def state_dict(self) -> dict:
        """Where the replay stands (steps taken) and what it replays, for :meth:`load_state_dict`."""
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "store": self.store.digest,
                "num_images": len(self.index), "teacher_weights": self.teacher_weights}

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state``'s step, mid-epoch too; refused if it replayed another store, seed, batch size or
        teacher weighting, if it is not a ReplayLoader's state, or while an iterator over this loader is live."""
        ours = self.state_dict()
        if not isinstance(state, dict) or not ours.keys() - {"teacher_weights"} <= state.keys():
            shown = f"a dict with keys {sorted(state)}" if isinstance(state, dict) else repr(state)
            raise MealV2Error(f"ReplayLoader.load_state_dict: {shown} is not a ReplayLoader's state; expected "
                              f"what ReplayLoader.state_dict() returns, a dict with keys {sorted(ours)}")
        check_values("ReplayLoader.load_state_dict", {"step": (INT_FROM_0, state["step"])})
        diff = [f"{k}: the saved loader has {state.get(k)!r}, this one {ours[k]!r}"
                for k in ("seed", "batch_size", "store", "num_images", "teacher_weights") if state.get(k) != ours[k]]
        if diff:
            raise MealV2Error("ReplayLoader.load_state_dict: the saved state replays other crops, so it would not "
                              "continue exactly:\n  " + "\n  ".join(diff)
                              + "\nBuild the loader with the saved run's store, data, seed, batch_size and "
                                "teacher_weights")
        self._refuse_live("load a state")
        self.step = int(state["step"])
