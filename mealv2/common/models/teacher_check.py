"""Check each teacher's input against the dataset labels before anything is labelled or trained.

A teacher fed the wrong mean/std, or whose outputs are in another class order than the
dataset's folders, still produces confident soft labels: they are just wrong, and a student
distilled from them learns less than from hard labels, without a word. Where the dataset has
labels, each teacher is run on round 0's crops of a sample spread over every class, as
configured and with the other common normalisations (imagenet, 0.5, none), and its
predictions are also scored through the best one-to-one mapping of its classes to the
dataset's (the assignment that maximises the confusion matrix's matched mass, fitted on one
half of the images and scored on the other, so a weak teacher's chance matches do not count).
If another configuration agrees clearly better than the configured one (paired over the same
crops: at least ``MIN_GAIN`` more agreement and a McNemar z of ``MIN_Z``), the run stops with
an error naming the teacher, both agreements and the fix, and the command line with the fix
applied (each teacher's own ``--teacher-classes N=FILE``, so a correct teacher of the ensemble
keeps its classes).
"""
from __future__ import annotations

import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..data.loaders.base import CropRequest, View
from ..data.crops import CropParams, sample_crops
from ..data.dataset import DatasetIndex
from ..errors import MealV2Error
from ..data.loaders.registry import iterate
from .teachers import NORMS, Ensemble, Spec, Teacher, norm_name

SAMPLE_IMAGES = 1024          # about this many images, at least 2 per class where there are 2
MIN_GAIN = 0.10               # agreement points another configuration must gain ...
MIN_Z = 3.0                   # ... at this paired significance, to be called clearly better
CANDIDATE_NORMS = ("imagenet", "0.5", "none")
RAW = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


class TeacherInputError(MealV2Error):
    """A teacher agrees clearly better with the labels under another input configuration."""


@dataclass
class TeacherCheck:
    """What the check found for one teacher (recorded in the store, shown by inspect)."""

    teacher: str
    crops: int
    agreement: float                  # top-1 == dataset label, as configured
    by_norm: dict[str, float]         # identity class order, per normalisation
    mapped: float                     # best one-to-one class mapping (held out), configured normalisation
    best: str                         # 'as configured' or what agrees better
    verdict: str                      # 'ok' | 'normalisation' | 'class order' | 'normalisation and class order'

    def line(self) -> str:
        norms = ", ".join(f"{name} {100 * a:.1f}%" for name, a in self.by_norm.items())
        return (f"{self.teacher}: {100 * self.agreement:.1f}% of {self.crops} crops agree with the dataset "
                f"labels as configured; by normalisation: {norms}; with the best class mapping "
                f"{100 * self.mapped:.1f}%: {self.verdict}")


def sample_ids(labels: np.ndarray, target: int = SAMPLE_IMAGES, seed: int = 0) -> np.ndarray:
    """Sorted image ids: ``ceil(target / K)`` (at least 2) random images of each of the K classes
    the labels hold (fewer than the label space's when the teachers know more classes)."""
    present = np.unique(labels)
    per_class = max(2, math.ceil(target / len(present)))
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in present]
    return np.sort(np.concatenate(picked))


def _normalise(raw: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=raw.dtype, device=raw.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=raw.dtype, device=raw.device).view(1, 3, 1, 1)
    return (raw - m) / s


def _mapped_correct(pred: np.ndarray, y: np.ndarray, half: np.ndarray, num_classes: int) -> np.ndarray:
    """Per crop: is the prediction right through a class mapping fitted on the other half?"""
    out = np.zeros(len(y), bool)
    for h in (0, 1):
        fit, score = half != h, half == h
        confusion = np.zeros((num_classes, num_classes))
        np.add.at(confusion, (pred[fit], y[fit]), 1)
        rows, cols = linear_sum_assignment(-confusion)      # teacher class -> dataset class
        mapping = np.empty(num_classes, np.int64)
        mapping[rows] = cols
        out[score] = mapping[pred[score]] == y[score]
    return out


def best_mapping(pred: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """Dataset class of each teacher output under the best one-to-one mapping, fitted on all crops."""
    confusion = np.zeros((num_classes, num_classes))
    np.add.at(confusion, (pred, y), 1)
    rows, cols = linear_sum_assignment(-confusion)
    mapping = np.empty(num_classes, np.int64)
    mapping[rows] = cols
    return mapping


def clearly_better(better: np.ndarray, base: np.ndarray) -> bool:
    """Paired comparison over the same crops (McNemar): a gain of MIN_GAIN at z >= MIN_Z."""
    gained, lost = int((better & ~base).sum()), int((~better & base).sum())
    if gained + lost == 0:
        return False
    return (gained - lost) / len(base) >= MIN_GAIN and (gained - lost) / math.sqrt(gained + lost) >= MIN_Z


def predictions(ensemble: Ensemble, index: DatasetIndex, ids: np.ndarray, crop: CropParams, crops: int,
                seed: int, batch_images: int, workers: int, loader: str = "auto") -> dict[tuple[int, str], np.ndarray]:
    """Top-1 class (dataset order) of every teacher under every candidate normalisation, per crop."""
    teachers = ensemble.teachers
    views = sorted({t.res for t in teachers})
    raw_views = [View(res, *RAW) for res in views]
    norms = [{"configured": (t.mean, t.std), **{n: NORMS[n] for n in CANDIDATE_NORMS}} for t in teachers]
    out: dict[tuple[int, str], list] = {(i, n): [] for i, t in enumerate(teachers) for n in norms[i]}
    boxes, flips = sample_crops(seed, 0, ids, index.sizes[ids], crops, crop)
    requests = [CropRequest(ids[a:a + batch_images], boxes[a:a + batch_images], flips[a:a + batch_images])
                for a in range(0, len(ids), batch_images)]
    runtime = ensemble.runtime
    for batch in iterate(loader, index, requests, raw_views, crops, batch_size=batch_images,
                         device=runtime.device.type, threads=workers):
        with torch.no_grad(), runtime.autocast():
            for i, t in enumerate(teachers):
                raw = runtime.input(batch.views[views.index(t.res)])
                for name, (mean, std) in norms[i].items():
                    out[(i, name)].append(t.logits(_normalise(raw, mean, std)).float().argmax(1).cpu().numpy())
    return {key: np.concatenate(v) for key, v in out.items()}


def check_teachers(ensemble: Ensemble, index: DatasetIndex, crop: CropParams, crops: int, seed: int = 0,
                   batch_size: int = 256, workers: int = 2, loader: str = "auto",
                   suggest_dir: Path | None = None, argv: list[str] | None = None) -> list[TeacherCheck]:
    """Check every teacher (see the module docstring); raises TeacherInputError naming the fix and,
    where it writes the class files (``suggest_dir``), the corrected command line (``argv``: this
    command's arguments, default sys.argv's)."""
    k = len(index.classes)
    ids = sample_ids(index.labels, seed=seed)
    y = np.repeat(index.labels[ids], crops)
    # Two halves of the images, alternating within each class, for the held-out mapping.
    rank_in_class = np.zeros(len(ids), np.int64)
    for c in range(k):
        at = np.flatnonzero(index.labels[ids] == c)
        rank_in_class[at] = np.arange(len(at))
    half = np.repeat(rank_in_class % 2, crops)
    preds = predictions(ensemble, index, ids, crop, crops, seed, max(1, batch_size // crops), workers, loader)
    checks, problems, specs, class_files = [], [], {}, {}
    for i, t in enumerate(ensemble.teachers):
        correct = {name: preds[(i, name)] == y for (j, name) in preds if j == i}
        mapped = {name: _mapped_correct(preds[(i, name)], y, half, k) for name in correct}
        configured = correct["configured"]
        candidates = {(name, False): c for name, c in correct.items()}
        candidates.update({(name, True): c for name, c in mapped.items()})
        (norm, remap), best = max(candidates.items(), key=lambda kv: kv[1].mean())
        better = clearly_better(best, configured)
        wrong_norm = better and norm != "configured" and NORMS[norm] != (tuple(t.mean), tuple(t.std))
        verdict = ("ok" if not better else " and ".join(
            (["normalisation"] if wrong_norm else []) + (["class order"] if remap else [])) or "ok")
        by_norm = {norm_name(t.mean, t.std) + " (configured)": float(configured.mean()),
                   **{n: float(correct[n].mean()) for n in CANDIDATE_NORMS
                      if NORMS[n] != (tuple(t.mean), tuple(t.std))}}
        best_text = "as configured" if verdict == "ok" else (
            (f"%{norm}" if wrong_norm else "") + (" with its classes re-mapped" if remap else ""))
        check = TeacherCheck(teacher=t.spec, crops=len(y), agreement=float(configured.mean()), by_norm=by_norm,
                             mapped=float(mapped["configured"].mean()), best=best_text.strip(), verdict=verdict)
        checks.append(check)
        if verdict != "ok":
            mapping = best_mapping(preds[(i, norm)], y, k) if remap else None
            path = _write_classes(t, i, mapping, index, suggest_dir) if remap and suggest_dir is not None else None
            problems.append(_problem(t, i, check, float(best.mean()), norm if wrong_norm else None, remap, path))
            if wrong_norm:
                specs[i + 1] = _with_norm(t.spec, norm)
            if path is not None:
                class_files[i + 1] = str(path)
    if problems:
        command = ""
        if specs or class_files:
            argv = sys.argv[1:] if argv is None else argv
            command = f"\nThe command with these fixes:\n  {corrected_command(argv, specs, class_files)}"
        raise TeacherInputError("\n".join(problems) + command
                                + "\nOr pass --no-teacher-check to go on as configured.")
    return checks


def _write_classes(t: Teacher, i: int, mapping: np.ndarray, index, suggest_dir: Path) -> Path:
    """``teacherN-classes.suggested.txt``: the dataset class the mapping found for each of the
    teacher's outputs, in output order (``mapping`` is over the label space, which the teacher's
    ``index`` maps from its outputs)."""
    outputs = range(len(mapping)) if t.index is None else t.index.tolist()
    names = [""] * len(mapping)
    for j, o in enumerate(outputs):
        names[o] = str(index.classes[mapping[j]])
    path = Path(suggest_dir) / f"teacher{i + 1}-classes.suggested.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(names) + "\n")
    return path


def corrected_command(argv: list[str], specs: dict[int, str], class_files: dict[int, str]) -> str:
    """This command's line with teacher N's spec replaced by ``specs[N]`` and ``--teacher-classes
    N=FILE`` for each of ``class_files`` (replacing any such option given for N)."""
    out, n, i = [], 0, 0
    while i < len(argv):
        a, prefix = argv[i], None
        if a in ("-t", "--teachers") and i + 1 < len(argv):
            out.append(a)
            prefix, value, i = "", argv[i + 1], i + 2
        elif a.startswith("--teachers="):
            prefix, value, i = "--teachers=", a[len("--teachers="):], i + 1
        elif a.startswith("-t") and not a.startswith("--") and len(a) > 2:
            prefix, value, i = "-t", a[2:], i + 1
        elif a == "--teacher-classes" and i + 1 < len(argv) and _teacher_number(argv[i + 1]) in class_files:
            i += 2
            continue
        elif a.startswith("--teacher-classes=") and _teacher_number(a.split("=", 1)[1]) in class_files:
            i += 1
            continue
        else:
            out.append(a)
            i += 1
            continue
        parts = []
        for part in value.split(","):
            if part.strip():
                n += 1
                part = specs.get(n, part)
            parts.append(part)
        out.append(prefix + ",".join(parts))
    for k, path in sorted(class_files.items()):
        out += ["--teacher-classes", f"{k}={path}"]
    prog = "torchrun ... -m mealv2.cli" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "mealv2"
    return f"{prog} {shlex.join(out)}"


def _teacher_number(value: str) -> int | None:
    n = value.split("=", 1)[0].strip()
    return int(n) if n.isdigit() else None


def _problem(t: Teacher, i: int, check: TeacherCheck, best: float, norm: str | None, remap: bool,
             path: Path | None) -> str:
    fixes = []
    if norm is not None:
        fixes.append(f"state its normalisation in the spec: {_with_norm(t.spec, norm)}")
    if remap:
        where = (f": the mapping found is in {path} (check it against how the teacher was trained); pass "
                 f"--teacher-classes {i + 1}={path}" if path is not None else "")
        fixes.append(f"its outputs are in another class order than the dataset's folders: give its class names "
                     f"in output order, one per line, with --teacher-classes {i + 1}=FILE{where}")
    return (f"teacher {i + 1} '{t.spec}' ({t.arch}, mean/std {norm_name(t.mean, t.std)}: {t.norm_from}): "
            f"{100 * check.agreement:.1f}% of {check.crops} crops agree with the dataset labels as configured, "
            f"{100 * best:.1f}% {check.best}. Fix: " + "; ".join(fixes) + ".")


def _with_norm(spec: str, norm: str) -> str:
    """The spec with its %NORM replaced or added (before *W, after @RES)."""
    s = Spec.parse(spec)
    return s.body + (f"@{s.res}" if s.res else "") + f"%{norm}" + (f"*{s.weight:g}" if s.weight != 1 else "")

