"""The trainer's three modes, as objects one loop treats alike.

  stored  (--labels STORE)   replay the store's crops; target = stored top-k + residual
  hard    (--hard-labels)    fresh crops each pass; cross-entropy on the dataset labels
  online  (--teachers SPEC)  fresh crops; the teachers run on every step's crops

:func:`make_mode` picks the class by ``cfg.mode`` (:data:`MODES`); its ``open`` reads the label
source and refuses what does not match DATA before anything is trained. The mode then gives the
loop what differs between the modes: the classes, the student's crop and resolution schedule, the
loader's labels, the views a step renders, each step's targets, the objective, its plan lines, and
what a checkpoint and a resume must know about it. :class:`Mode`'s defaults are those of a mode
whose loader gives the targets (stored, hard); the stored mode adds its store, online its teachers.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from ..common.config import command_args, config_args
from ..common.data.crops import CropParams
from ..common.data.dataset import DatasetIndex, skipped_report
from ..common.data.loaders.base import View
from ..common.errors import MealV2Error
from ..common.models.distributed import DistInfo
from ..common.models.runtime import Runtime
from ..common.models.teacher_check import check_teachers
from ..common.models.teachers import (Ensemble, load_teacher, naming_extra_classes, read_classes_file,
                                      read_teacher_classes, teacher_table)
from ..common.store.label_store import LabelStore
from .config import TrainConfig
from .loader import FreshLabels, StoredLabels
from .losses import Mix, mix_targets, objective_losses
from .replay import check_store_matches, data_index, layer_weights, open_checked_store, store_hard_labels
from .res_schedule import ResSchedule, res_schedule


@dataclass(frozen=True)
class Objective:
    """The loss terms the student minimises, as their sum: distillation (soft cross-entropy at the
    targets' temperature; plain cross-entropy on class ids) and, with a discriminator, its BCE. A term
    is a field here and a line in :meth:`losses`."""

    temperature: float = 1.0           # the targets' softmax temperature (the store's, or online --temperature)
    topk: int | None = None            # stored targets: the store's k (the discriminator's input form)
    hard_label_weight: float = 0.0     # --hard-label-weight: the dataset labels' share of the loss (losses.py)

    def losses(self, logits: torch.Tensor, target: torch.Tensor, disc: nn.Module | None = None,
               labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(distillation loss, discriminator loss or None); with ``labels`` (one-hot or mixed) and a
        hard-label weight, the loss weighs them in as losses.objective_losses says."""
        return objective_losses(logits, target, self.temperature, disc, self.topk, labels=labels,
                                hard_label_weight=self.hard_label_weight)


class EpochViews(NamedTuple):
    """What one pipeline call renders, the student's view first, and where each teacher's view is in it."""

    rendered: list[View]
    teachers: list[int]


# ---- the stored mode's label source -------------------------------------------------------------------
def open_store(cfg: TrainConfig, info: DistInfo = DistInfo()) -> LabelStore:
    """The store, refused unless complete and made with the scale, ratio and crops per image given
    (replay.open_checked_store); the res given is the student's and may differ from the store's."""
    given = {name: getattr(cfg, name) for name in ("scale", "ratio", "crops_per_image")}
    return open_checked_store(cfg.labels, info, {name: (" ".join(command_args({name: value})),
                                                        list(value) if isinstance(value, tuple) else value)
                                                 for name, value in given.items() if value is not None},
                              teacher_weights=cfg.teacher_weights)


def student_schedule(cfg: TrainConfig, store: LabelStore | None) -> ResSchedule:
    """The student's resolution per epoch. Its final res is --res; with --labels the store's unless
    --res is given: the stored boxes are relative and a soft label describes the box's content, so a
    student renders them at any res (the store's labelling res stays in its attrs)."""
    if store is None or cfg.res is not None:
        final, where = cfg.fresh_crop.res, "--res"
    else:
        final, where = int(store.attrs["crop"]["res"]), f"the res {store.path} was labelled at; --res sets another"
    return res_schedule(final, cfg.epochs, cfg.min_res, cfg.ramp_start, cfg.ramp_end, cfg.res_step, where)


def read_index(cfg: TrainConfig, store: LabelStore | None, info: DistInfo, say: Callable) -> DatasetIndex:
    """DATA's index (replay.data_index), saying which files it left out."""
    index = data_index(cfg.data, store, info, workers=cfg.workers, progress=cfg.progress and info.is_main)
    if skipped := skipped_report(index):
        say(skipped)
    return index


# ---- the modes -----------------------------------------------------------------------------------------
@dataclass(eq=False)
class Mode:
    """What the loop needs of a mode. These defaults are a mode whose loader gives the targets."""

    name: ClassVar[str]
    cfg: TrainConfig
    index: DatasetIndex
    classes: tuple[str, ...]           # the student's outputs, in target order
    crop: CropParams                   # the student's crop; its res is the final one (validation, checkpoints)
    schedule: ResSchedule              # the student's res per epoch
    labels: StoredLabels | FreshLabels  # the loader's label source
    objective: Objective

    def prepare(self, *, device: torch.device, run: Path, info: DistInfo, say: Callable, resuming: bool) -> None:
        """What is made once the student is (online: the teachers). Nothing here."""

    @property
    def teacher_views(self) -> list[View]:
        return []

    def views(self, student: View) -> EpochViews:
        """The views a step renders with the student's at ``student``: a teacher that sees what the
        student sees shares its rendering."""
        rendered = [student] + [v for v in self.teacher_views if v != student]
        return EpochViews(rendered, [rendered.index(v) for v in self.teacher_views])

    def targets(self, given: torch.Tensor | None, rendered: list[torch.Tensor], views: EpochViews,
                mix: Mix | None, lam: float) -> torch.Tensor:
        """A step's targets for the ``rendered`` views (mixed by ``mix``, the crops keeping ``lam`` of
        their own images): the loader's, mixed by the area each crop keeps."""
        return given if mix is None else mix_targets(mix, lam, given, len(self.classes))

    def plan_lines(self, passes: float) -> list[str]:
        """The plan's lines about the labels and the student's resolution."""
        return [resolution_line(self.schedule, self.cfg.epochs)] if self.schedule.progressive else []

    def loader_checks(self) -> dict:
        """TrainLoader's per-batch checks of the images (none: nothing was labelled from their bytes)."""
        return {}

    def hard_labels(self) -> np.ndarray | None:
        """Each image's dataset label, yielded beside the targets when --hard-label-weight weighs them in."""
        return self.index.labels if self.cfg.hard_label_weight else None

    def store_record(self) -> dict | None:
        """The label store, as RUN/config.json records it."""
        return None

    @property
    def store_digest(self) -> str | None:
        """What a checkpoint records of the labels (the store's digest)."""
        return None

    def resume_diffs(self, ckpt: dict, say: Callable) -> list[str]:
        """Why continuing the run of ``ckpt`` would train on other labels, beyond the config's fields."""
        return []

    def res_hint(self, was: ResSchedule) -> str:
        """A hint for a resume whose student schedule differs from the run's (``was``)."""
        return ""


@dataclass(eq=False)
class StoredMode(Mode):
    """Replays a label store's crops and soft targets (--labels STORE)."""

    name = "stored"
    store: LabelStore

    @classmethod
    def open(cls, cfg: TrainConfig, info: DistInfo, say: Callable) -> StoredMode:
        store = open_store(cfg, info)
        schedule = student_schedule(cfg, store)
        index = read_index(cfg, store, info, say)
        classes, note = check_store_matches(store, index, cfg.data)
        if note:
            say(note)
        crop = dataclasses.replace(CropParams.from_attrs(store.attrs["crop"]), res=schedule.final)
        return cls(cfg, index, classes, crop, schedule, StoredLabels(store, layer_weights(store, cfg.teacher_weights)),
                   Objective(temperature=store.attrs["temperature"], topk=store.attrs["topk"],
                             hard_label_weight=cfg.hard_label_weight), store=store)

    def plan_lines(self, passes: float) -> list[str]:
        a, rounds, crops = self.store.attrs, self.labels.rounds, self.labels.crops_per_image
        round_bytes = len(self.index) * crops * (4 * 2 + 1 + a["topk"] * self.store.id_dtype.itemsize + a["topk"] + 1)
        lines = [resolution_line(self.schedule, self.cfg.epochs, made=f", labels made at {a['crop']['res']} px"),
                 f"  labels: {self.store.path}, {rounds} rounds (pass p replays round p mod {rounds}: "
                 f"{replays(passes, rounds)}), top-{a['topk']}, T = {self.objective.temperature:g}; one round in "
                 f"RAM per rank: {round_bytes / 2**20:.1f} MiB"]
        if self.labels.weights is not None:
            layers = self.store.layers
            lines.append("  targets: the per-teacher layers averaged with weights " + ", ".join(
                f"{w:g} x {layers[j]['teacher']['spec']}" for j, w in self.labels.weights.items())
                + " (--teacher-weights), not the stored ensemble")
        if passes > rounds:
            lines.append(f"  note: {passes:.2f} passes over {rounds} rounds replay a round {passes / rounds:.2f} "
                         f"times on average; `mealv2 label ... --rounds N` appends rounds")
        return lines

    def hard_labels(self) -> np.ndarray | None:
        """The labels the store recorded from its dataset (refused for a store of unlabelled images)."""
        weight = self.cfg.hard_label_weight
        return store_hard_labels(self.store, f"--hard-label-weight {weight:g}") if weight else None

    def loader_checks(self) -> dict:
        """A batch whose image bytes differ from what was labelled is refused (the store's CRC32C per image)."""
        return dict(expected_crcs=self.store.crcs(), store_path=self.store.path)

    def store_record(self) -> dict:
        return dict(path=str(self.store.path), digest=self.store.digest, rounds=self.labels.rounds,
                    attrs=self.store.attrs)

    @property
    def store_digest(self) -> str:
        return self.store.digest

    def resume_diffs(self, ckpt: dict, say: Callable) -> list[str]:
        """The run's store, or that store grown by rounds since (`mealv2 label --rounds N` appends rounds and
        keeps the earlier ones): a user who labels more rounds to train longer resumes, onto the new rounds."""
        was, now = ckpt.get("store_digest"), self.store.rounds_planned
        if was == self.store.digest:
            return []
        if (rounds := self.store.grown_from(was)) is not None:
            say(f"labels: {self.store.path} has grown from {rounds} to {now} rounds since the run's last epoch "
                f"(its earlier rounds unchanged); the passes from here replay round p mod {now}")
            return []
        return [f"labels: the run was trained on another label store than {self.store.path} (store digests differ)"]

    def res_hint(self, was: ResSchedule) -> str:
        if self.cfg.res is not None or was.final == self.schedule.final:
            return ""
        return (f" (with --labels, --res defaults to the store's {self.schedule.final} px; pass --res {was.final} "
                f"to keep the run's)")


def fresh_data(cfg: TrainConfig, info: DistInfo, say: Callable, flag: str) -> tuple[ResSchedule, DatasetIndex]:
    """The schedule and index of a mode that draws new crops; DATA must have labels (its classes)."""
    schedule = student_schedule(cfg, None)
    index = read_index(cfg, None, info, say)
    if not index.labelled:
        raise MealV2Error(f"{flag}: DATA {cfg.data} has no labels (a folder of loose images or a CSV without a "
                          f"'label' column), and its classes would come from teachers; label a store with "
                          f"`mealv2 label` and train with --labels STORE")
    return schedule, index


def fresh_labels(cfg: TrainConfig, index: DatasetIndex, labels: np.ndarray | None) -> FreshLabels:
    """New crops every pass from the stage-1 sampler, with ``labels`` as their targets (None: none)."""
    return FreshLabels(cfg.seed, index.sizes, cfg.fresh_crops_per_image, cfg.fresh_crop, labels)


@dataclass(eq=False)
class HardMode(Mode):
    """Cross-entropy on DATA's labels, fresh crops each pass (--hard-labels)."""

    name = "hard"

    @classmethod
    def open(cls, cfg: TrainConfig, info: DistInfo, say: Callable) -> HardMode:
        schedule, index = fresh_data(cfg, info, say, "--hard-labels")
        return cls(cfg, index, index.classes, cfg.fresh_crop, schedule, fresh_labels(cfg, index, index.labels), Objective())


@dataclass(eq=False)
class OnlineMode(Mode):
    """The teachers label every step's fresh crops (--teachers SPEC)."""

    name = "online"
    ensemble: Ensemble | None = None   # loaded by prepare

    @classmethod
    def open(cls, cfg: TrainConfig, info: DistInfo, say: Callable) -> OnlineMode:
        schedule, index = fresh_data(cfg, info, say, "online training (--teachers)")
        return cls(cfg, index, index.classes, cfg.fresh_crop, schedule, fresh_labels(cfg, index, None),
                   Objective(temperature=cfg.temperature, hard_label_weight=cfg.hard_label_weight))

    def prepare(self, *, device: torch.device, run: Path, info: DistInfo, say: Callable, resuming: bool) -> None:
        """The teachers, after the student: they are created from torch's RNG, which the student's
        seeded initialisation draws from first. Checked as `mealv2 label` checks them unless resuming."""
        cfg = self.cfg
        names = read_classes_file(cfg.classes_file) if cfg.classes_file else None
        stated = read_teacher_classes(cfg.teacher_classes, len(cfg.teachers))
        with naming_extra_classes(cfg.data, self.index, names):
            teachers = [load_teacher(spec, self.classes, self.crop.res, names, stated_classes=stated.get(i))
                        for i, spec in enumerate(cfg.teachers, 1)]
        say(teacher_table(teachers, self.crop.res))
        self.ensemble = Ensemble(teachers, Runtime(device, cfg.teacher_precision), cfg.temperature)
        if not resuming:
            self._check_teachers(run, info, say)

    def _check_teachers(self, run: Path, info: DistInfo, say: Callable) -> None:
        """The teacher check of `mealv2 label` (common/models/teacher_check.py), before the first step."""
        cfg = self.cfg
        if not cfg.teacher_check:
            say("teacher check: skipped (--no-teacher-check)")
            return
        outcome = None
        if info.is_main:
            try:
                for check in check_teachers(self.ensemble, self.index, self.crop, cfg.fresh_crops_per_image,
                                            cfg.seed, cfg.batch_size, cfg.workers, loader=cfg.loader,
                                            suggest_dir=run, argv=["train", *config_args(cfg)]):
                    say(f"teacher check: {check.line()}")
            except MealV2Error as e:
                outcome = e
        outcome = info.broadcast_object(outcome)
        if outcome is not None:
            raise outcome

    @property
    def teacher_views(self) -> list[View]:
        return self.ensemble.views

    def targets(self, given: torch.Tensor | None, rendered: list[torch.Tensor], views: EpochViews,
                mix: Mix | None, lam: float) -> torch.Tensor:
        """The teachers' averaged softmax on the rendered views, mixed ones too (MEAL V2's --w-cutmix:
        the teachers label the mixed crops)."""
        return self.ensemble.probs([rendered[i] for i in views.teachers])


MODES: dict[str, type[Mode]] = {"stored": StoredMode, "hard": HardMode, "online": OnlineMode}


def make_mode(cfg: TrainConfig, info: DistInfo, say: Callable) -> Mode:
    """``cfg``'s mode (``cfg.mode``), its labels read and checked against DATA."""
    return MODES[cfg.mode].open(cfg, info, say)


# ---- plan lines ----------------------------------------------------------------------------------------
def shown_res(schedule: ResSchedule) -> str:
    """The student's res as the plan shows it: ``MIN-FINAL`` when progressive."""
    return f"{schedule.min_res}-{schedule.final}" if schedule.progressive else str(schedule.final)


def resolution_line(schedule: ResSchedule, epochs: int, *, made: str = "") -> str:
    ramp = (f" (progressive, multiples of {schedule.step}: {schedule.describe(epochs)}; "
            f"{100 * schedule.pixel_fraction(epochs):.0f}% of the pixels of {schedule.final} px throughout)"
            if schedule.progressive else "")
    return (f"  resolution: student at {shown_res(schedule)} px{ramp}{made}; validation and checkpoints at "
            f"{schedule.final} px")


def replays(passes: float, rounds: int) -> str:
    """How often each round is replayed when pass p replays round p mod ``rounds`` (the last pass
    may be partial): the first rounds get one pass more than the others when the passes do not
    divide evenly."""
    times = [sum(min(1.0, passes - p) for p in range(r, math.ceil(passes), rounds)) for r in range(rounds)]
    shown = [f"{t:.1f}" for t in times]
    if len(set(shown)) == 1:
        return f"each round {passes / rounds:.2f} times"
    groups: list[list] = []      # [first round, last round, times shown]
    for r, text in enumerate(shown):
        if groups and groups[-1][2] == text:
            groups[-1][1] = r
        else:
            groups.append([r, r, text])
    parts = ", ".join(f"{f'round {a}' if a == b else f'rounds {a}-{b}'} {t} times" for a, b, t in groups)
    return f"{parts}; {passes / rounds:.2f} on average"
