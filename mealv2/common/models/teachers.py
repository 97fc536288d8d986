"""Teachers: what a spec means, how each sees its input, and their ensemble.

A teacher's input is its resolution, its mean/std and its class order, and none of them can
be read from a plain state dict. One rule decides them, the same in `label`, online `train`,
`verify` and for state dicts in `eval`:

=====================  ==========================  ==========================  ==================
spec                   resolution                  mean/std                    class order
=====================  ==========================  ==========================  ==================
``ARCH=CKPT``          the command's ``--res``     imagenet                    ``--classes FILE``, else
                                                                               the dataset's
``CKPT`` (mealv2)      recorded in the checkpoint  recorded                    recorded (by name)
``ARCH`` (timm)        timm's pretrained config    timm's pretrained config    timm's names (ImageNet
                                                                               WordNet ids); the
                                                                               dataset's order when
                                                                               its names are others
=====================  ==========================  ==========================  ==================

Suffixes override: ``@RES`` the resolution, ``%NORM`` the mean/std (``imagenet``,
``inception`` or ``0.5``, ``clip``, ``none`` for raw [0, 1] pixels, ``timm`` for timm's
config of the architecture, or explicit ``M:M:M/S:S:S``), ``*W`` the ensemble weight, e.g.
``convnext_tiny=ckpt.pth@288%0.5*2``. Each teacher's outputs are re-indexed into the
label space's class order before they are averaged.

``--teacher-classes N=FILE`` names teacher N's outputs in output order, whatever its kind: it
overrides ``--classes`` for a state dict, the classes a mealv2 checkpoint records and timm's
names, so one teacher of an ensemble can be corrected without touching the others (the teacher
check writes the FILE and prints the command).

The label space (:func:`load_teachers`) is the dataset's classes when the teachers have the
same; the teachers' classes when the dataset has no labels, or when its classes are a subset
of the teachers' (ImageNet teachers on a 10-class folder): the dataset's labels are then mapped
by name into it. All teachers must have the same classes (in any order).
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.data import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN,
                       IMAGENET_INCEPTION_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageNetInfo,
                       infer_imagenet_subset)
from torch import nn

from ..config import MEAN, STD
from ..data.loaders.base import View
from ..data.dataset import class_sources
from ..errors import MealV2Error
from ..store.faults import fault_point
from .checkpoints import (ClassCountError, ModelSpecError, create_timm_model, default_data_config, is_mealv2_checkpoint,
                     load_checkpoint_file, load_weights, model_from_mealv2_checkpoint, pretrained_cfg,
                     preview_classes, state_dict_sha256, unwrap_state_dict)
from .runtime import Runtime
from ..data.targets import ensemble_probs, mix_probs, teacher_probs

NORMS = {  # named normalisations a spec can state with %NAME
    "imagenet": (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)),
    "0.5": (tuple(IMAGENET_INCEPTION_MEAN), tuple(IMAGENET_INCEPTION_STD)),
    "inception": (tuple(IMAGENET_INCEPTION_MEAN), tuple(IMAGENET_INCEPTION_STD)),
    "clip": (tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
STATE_DICT_NORM = "imagenet"   # torchvision's and MEAL V2's convention, and most training loops'
# Any text after a suffix mark is taken as that suffix and validated, so a typo ('@abc', '*-1') is
# named as a bad suffix rather than becoming part of a file name that does not exist.
_SUFFIX = re.compile(r"(?:@(?P<res>[^@*%=/]*)|\*(?P<weight>[^@*%=/]*)|%(?P<norm>[^@*%=]*))$")
MAX_SPEC_RES = 4096   # @RES above it is a typo (the largest ImageNet teachers run at 800 px), not a request


def split_specs(specs: tuple[str, ...] | list[str]) -> list[str]:
    """``--teachers`` is repeatable and comma separated."""
    return [s.strip() for group in specs for s in group.split(",") if s.strip()]


@dataclass(frozen=True)
class Spec:
    text: str
    body: str
    res: int | None = None
    norm: str | None = None
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "Spec":
        """Suffixes are peeled off the end; a tail that is part of an existing file's name
        (``ckpt@v2.pth``) stays in the name. Each suffix is bounded, and an error names it."""
        body, found = text, {}
        while (m := _SUFFIX.search(body)) and m.start() > 0 and not Path(body.split("=", 1)[-1]).is_file():
            key = next(k for k, v in m.groupdict().items() if v is not None)
            if key in found:
                raise ModelSpecError(f"teacher spec '{text}': {key} given twice")
            found[key] = m[key]
            body = body[:m.start()]
        where = f"teacher spec '{text}'"
        res = _spec_res(found["res"], where) if "res" in found else None
        weight = _spec_weight(found["weight"], where) if "weight" in found else 1.0
        if "norm" in found:
            parse_norm(found["norm"], where=where)
        return cls(text, body, res, found.get("norm"), weight)


def _spec_res(value: str, where: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= MAX_SPEC_RES:
        raise ModelSpecError(f"{where}: suffix '@{value}': expected the teacher's input resolution in pixels, "
                             f"an integer from 1 to {MAX_SPEC_RES} (e.g. @224)")
    return int(value)


def _spec_weight(value: str, where: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
        raise ModelSpecError(f"{where}: suffix '*{value}': expected the teacher's ensemble weight, a finite "
                             f"number > 0 (e.g. *2 or *0.5)")
    return weight


def parse_norm(norm: str, arch_config: tuple | None = None, where: str = "") -> tuple[tuple, tuple]:
    """A named normalisation, ``timm`` (``arch_config``: timm's (mean, std) of the architecture),
    or explicit ``M:M:M/S:S:S`` (or ``M/S`` for all three channels)."""
    if norm in NORMS:
        return NORMS[norm]
    if norm == "timm":
        return arch_config if arch_config is not None else ((0.0,) * 3, (1.0,) * 3)
    try:
        mean, std = ([float(v) for v in part.split(":")] for part in norm.split("/"))
        mean, std = (tuple(v * 3 if len(v) == 1 else v) for v in (mean, std))
        if MEAN.problem(mean) or STD.problem(std):
            raise ValueError
    except ValueError:
        raise ModelSpecError(f"{where}: normalisation '%{norm}': expected one of {', '.join(NORMS)}, timm, "
                             f"or explicit mean/std as M:M:M/S:S:S (finite numbers, std > 0)") from None
    return mean, std


def norm_name(mean, std) -> str:
    """The preset a mean/std is, or its values."""
    for name, (m, s) in NORMS.items():
        if all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip((*mean, *std), (*m, *s))):
            return name
    return "/".join(":".join(f"{v:.4g}" for v in part) for part in (mean, std))


def read_classes_file(path: str | Path, flag: str = "--classes") -> list[str]:
    """One class name per line, in a model's output order (blank lines and surrounding spaces ignored)."""
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise ModelSpecError(f"{flag} {path}: cannot read ({e.strerror or e})") from None
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if not names or duplicates:
        raise ModelSpecError(f"{flag} {path}: expected one distinct class name per line"
                             + (f"; repeated: {duplicates[:5]}" if duplicates else "; the file is empty"))
    return names


def read_teacher_classes(teacher_classes: dict[int, str], num_teachers: int) -> dict[int, list[str]]:
    """``--teacher-classes N=FILE``: teacher N's (1-based) output names, read and checked."""
    for n in teacher_classes:
        if not 1 <= n <= num_teachers:
            raise ModelSpecError(f"--teacher-classes {n}={teacher_classes[n]}: there are {num_teachers} teacher(s); "
                                 f"N is a teacher's position in --teachers, from 1 to {num_teachers}")
    return {n: read_classes_file(f, f"--teacher-classes {n}={f}") for n, f in teacher_classes.items()}


@dataclass
class Teacher:
    spec: str
    arch: str
    model: nn.Module
    res: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weight: float
    sha256: str
    kind: str = "state dict"            # 'state dict' | 'mealv2 checkpoint' | 'timm pretrained'
    res_from: str = ""                  # where res came from, for the teacher table
    norm_from: str = ""
    output_classes: list[str] | None = None   # names of its outputs, in output order (None: the dataset's)
    index: torch.Tensor | None = field(default=None, repr=False)  # label-space class j = output index[j]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def view(self) -> View:
        return View(self.res, tuple(self.mean), tuple(self.std))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits in the label space's class order."""
        out = self.model(x)
        return out if self.index is None else out.index_select(1, self.index.to(out.device))

    def to_attrs(self) -> dict:
        return {"spec": self.spec, "arch": self.arch, "sha256": self.sha256, "res": self.res,
                "mean": list(self.mean), "std": list(self.std), "weight": self.weight,
                "output_classes": self.output_classes}


def load_teacher(spec: str, classes, res: int | None = None, state_dict_classes: list[str] | None = None, *,
                 stated_classes: list[str] | None = None) -> Teacher:
    """One teacher whose outputs are mapped by name onto ``classes`` (see :func:`build_teacher`)."""
    teacher = build_teacher(spec, classes, res, state_dict_classes, stated_classes=stated_classes)
    teacher.index = class_index(teacher, classes)
    return teacher


def load_teachers(specs: list[str], dataset_classes, res: int | None = None,
                  state_dict_classes: list[str] | None = None, *, stated_classes: dict[int, list[str]] | None = None
                  ) -> tuple[list[Teacher], list[str], str | None]:
    """The teachers, the label space's classes (module docstring) with each teacher's outputs
    mapped onto them, and a line to print when those are not the dataset's classes.
    ``stated_classes``: ``--teacher-classes``, by 1-based teacher number."""
    stated = stated_classes or {}
    teachers = [build_teacher(spec, dataset_classes, res, state_dict_classes, stated_classes=stated.get(i))
                for i, spec in enumerate(specs, 1)]
    classes, note = label_space(teachers, dataset_classes)
    for t in teachers:
        t.index = class_index(t, classes)
    return teachers, classes, note


def label_space(teachers: list[Teacher], dataset_classes) -> tuple[list[str], str | None]:
    """The classes a store labels in: the dataset's, or the teachers' where the dataset has no
    labels or fewer classes. Refuses teachers whose classes differ, and dataset classes no teacher knows."""
    data = [str(c) for c in dataset_classes]
    names = [t.output_classes if t.output_classes is not None else data for t in teachers]
    for i, t in enumerate(teachers[1:], 2):
        only_first, only_this = sorted(set(names[0]) - set(names[i - 1])), sorted(set(names[i - 1]) - set(names[0]))
        if only_first or only_this:
            raise ModelSpecError(
                f"the teachers disagree on their classes: teacher 1 '{teachers[0].spec}' has {len(names[0])} classes "
                f"{preview_classes(names[0])}, teacher {i} '{t.spec}' has {len(names[i - 1])} "
                f"{preview_classes(names[i - 1])}; only teacher 1 has {preview_classes(only_first)}, only teacher "
                f"{i} has {preview_classes(only_this)}. All teachers must label the same classes")
    space = names[0]
    if not data:
        return space, (f"classes: DATA has no labels; the teachers' {len(space)} classes {preview_classes(space)} "
                       f"(in teacher 1's output order)")
    unknown = [c for c in data if c not in set(space)]
    if unknown:
        raise ModelSpecError(
            f"DATA has {len(unknown)} class(es) the teachers do not know: {preview_classes(unknown)}; the teachers' "
            f"{len(space)} classes are {preview_classes(space)}. Pass --classes FILE with the teachers' class names "
            f"(state dicts), or, if DATA's subfolders are not classes, list its images in a CSV with only a 'path' "
            f"column")
    if len(space) == len(data):
        return data, None       # the same classes: the dataset's order, as without teachers' names
    return space, (f"classes: the teachers' {len(space)} classes {preview_classes(space)}; DATA's {len(data)} are "
                   f"among them (its labels mapped by name), and students are trained on all {len(space)}")


def timm_class_names(cfg) -> list[str] | None:
    """The class names timm ships for a pretrained config (ImageNet WordNet ids such as
    'n01440764', the folder names of ImageNet's train set); None when timm has none."""
    n = int(getattr(cfg, "num_classes", 0) or 0)
    subset = infer_imagenet_subset(cfg) if n else None
    if subset is None or getattr(cfg, "label_offset", None):
        return None
    names = list(ImageNetInfo(subset).label_names())
    return names if len(names) == n else None


def build_teacher(spec: str, classes, res: int | None = None, state_dict_classes: list[str] | None = None, *,
                  stated_classes: list[str] | None = None) -> Teacher:
    """One teacher for a dataset with ``classes`` (empty: unlabelled), by the rule in this module's
    docstring; its outputs are not yet mapped onto a label space (``index`` None).

    ``res`` is the command's ``--res`` (state dicts without ``@RES`` run at it);
    ``state_dict_classes`` names a state dict's outputs in order (``--classes``);
    ``stated_classes`` names this teacher's outputs whatever its kind (``--teacher-classes``).
    Refuses what cannot fit the dataset.
    """
    s = Spec.parse(spec)
    classes = list(classes)
    if "=" in s.body:
        arch, ckpt_path = s.body.split("=", 1)
        if not Path(ckpt_path).is_file():
            raise ModelSpecError(f"teacher spec '{spec}': checkpoint file {ckpt_path} does not exist")
        output_classes = stated_classes or state_dict_classes
        if output_classes is None and not classes:
            raise ModelSpecError(f"teacher '{spec}': a state dict does not record its classes and DATA has no "
                                 f"labels; pass --classes FILE with its class names in output order, one per line")
        n = len(output_classes or classes)
        state = unwrap_state_dict(load_checkpoint_file(ckpt_path), ckpt_path)
        model = create_timm_model(arch, n, where=f"teacher spec '{spec}'")
        counted = f"--classes names {n}" if output_classes else f"dataset has {n}"
        load_weights(model, state, f"teacher '{spec}' ({ckpt_path}, {counted} classes)")
        kind, base_res = "state dict", (res, "--res")
        base_norm = (NORMS[STATE_DICT_NORM], "default for state dicts; %NORM states another")
        arch_config = default_data_config(model)[1:]
    elif Path(s.body).is_file():
        ckpt = load_checkpoint_file(s.body)
        if not is_mealv2_checkpoint(ckpt):
            raise ModelSpecError(f"teacher spec '{spec}': {s.body} is not a mealv2 checkpoint; for a "
                                 f"timm or MEAL V2 state dict write ARCH={s.body}")
        arch, kind, output_classes = ckpt["arch"], "mealv2 checkpoint", [str(c) for c in ckpt["classes"]]
        output_classes = _stated(stated_classes, len(output_classes), spec) or output_classes
        model = model_from_mealv2_checkpoint(ckpt, f"teacher '{spec}'")
        base_res = (int(ckpt["res"]), "checkpoint")
        base_norm = ((tuple(ckpt["mean"]), tuple(ckpt["std"])), "checkpoint")
        arch_config = default_data_config(model)[1:]
    else:
        arch, kind = s.body, "timm pretrained"
        if "/" in arch or arch.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise ModelSpecError(f"teacher spec '{spec}': file {arch} does not exist")
        cfg = pretrained_cfg(arch)
        n = int(getattr(cfg, "num_classes", 0) or 0) if cfg is not None else 0
        timm_names = timm_class_names(cfg) if cfg is not None else None
        unknown = [c for c in map(str, classes) if c not in set(timm_names or ())]
        # Labelled data under other names than timm's: its classes are taken to be the teacher's, in its order.
        output_classes = timm_names if not (classes and unknown) else None
        output_classes = _stated(stated_classes, n or len(output_classes or classes), spec) or output_classes
        if output_classes is None and (not classes or (n and n != len(classes))):
            why = ("timm ships no class names for them" if timm_names is None else
                   f"its class(es) {preview_classes(unknown)} are not among timm's names for them "
                   f"{preview_classes(timm_names)}")
            raise ModelSpecError(f"teacher '{spec}': timm's pretrained weights have {n or 'unknown'} classes, the "
                                 f"dataset has {len(classes)} {preview_classes(classes)}; {why}. Use a checkpoint "
                                 f"trained on these classes (ARCH=CKPT), or a dataset of the teacher's classes")
        model = create_timm_model(arch, len(output_classes or classes), pretrained=True,
                                  where=f"teacher spec '{spec}'")
        timm_res, mean, std = default_data_config(model)
        base_res, base_norm = (timm_res, "timm pretrained config"), ((mean, std), "timm pretrained config")
        arch_config = (mean, std)
    final_res, res_from = (s.res, "@RES") if s.res else base_res
    if final_res is None:
        raise ModelSpecError(f"teacher spec '{spec}': a state dict does not record its resolution; "
                             f"append @RES (the side it was trained at) or pass --res")
    (mean, std), norm_from = ((parse_norm(s.norm, arch_config, f"teacher spec '{spec}'"), f"%{s.norm}")
                              if s.norm else base_norm)
    return Teacher(spec=spec, arch=arch, model=model.eval(), res=int(final_res), mean=tuple(mean),
                   std=tuple(std), weight=s.weight, sha256=state_dict_sha256(model), kind=kind,
                   res_from=res_from, norm_from=norm_from, output_classes=output_classes)


def _stated(names: list[str] | None, outputs: int, spec: str) -> list[str] | None:
    """``--teacher-classes`` names for a teacher with ``outputs`` outputs, refused when the counts differ."""
    if names is not None and len(names) != outputs:
        raise ModelSpecError(f"teacher '{spec}' has {outputs} outputs, its --teacher-classes file names "
                             f"{len(names)} classes; name each output once, in output order")
    return names


def class_index(teacher: Teacher, classes: list[str]) -> torch.Tensor | None:
    """Output index of each label-space class, matched by name (see :func:`output_index`)."""
    if teacher.output_classes is None:
        return None
    return output_index(teacher.output_classes, classes, f"teacher '{teacher.spec}'")


def output_index(names: list[str], classes, who: str, extra_ok: bool = False) -> torch.Tensor | None:
    """Index of each of ``classes`` among a model's output ``names``; None when they are in the
    same order. Refuses a model that lacks one of ``classes`` or (unless ``extra_ok``) knows others."""
    names, classes = [str(n) for n in names], [str(c) for c in classes]
    if names == classes:
        return None
    missing = [c for c in classes if c not in names]
    extra = [] if extra_ok else [c for c in names if c not in classes]
    if missing or extra:
        raise ModelSpecError(
            f"{who} has {len(names)} classes {preview_classes(names)}, the dataset has "
            f"{len(classes)} {preview_classes(classes)}"
            + (f"; the model lacks {preview_classes(missing)}" if missing else "")
            + (f"; the dataset lacks {preview_classes(extra)}" if extra else ""))
    position = {name: i for i, name in enumerate(names)}
    return torch.tensor([position[c] for c in classes], dtype=torch.long)


def teacher_table(teachers: list[Teacher], res: int | None, space: str = "dataset") -> str:
    """One line per teacher (what `label` and online `train` print before the first crop);
    ``space`` names whose class order the outputs are mapped to."""
    lines = [f"teachers ({len(teachers)}):"]
    for i, t in enumerate(teachers, 1):
        order = (f"{space} order" if t.index is None else f"mapped by name to the {space}'s order")
        lines.append(f"  {i}. {t.spec}: {t.arch} ({t.kind}, {t.num_params / 1e6:.2f}M params), {t.res} px "
                     f"({t.res_from}), mean/std {norm_name(t.mean, t.std)} "
                     f"{tuple(round(v, 4) for v in t.mean)}/{tuple(round(v, 4) for v in t.std)} ({t.norm_from}), "
                     f"weight {t.weight:g}, classes: {order}")
    if res is not None:
        other = [f"{i} ({t.arch}) at {t.res} px" for i, t in enumerate(teachers, 1) if t.res != res]
        if other:
            lines.append(f"  not at --res {res}: teacher {', '.join(other)}")
    return "\n".join(lines)


class Ensemble:
    """Teachers in eval mode on one device; views are deduplicated across teachers."""

    def __init__(self, teachers: list[Teacher], runtime: Runtime, temperature: float = 1.0):
        self.teachers, self.runtime, self.temperature = teachers, runtime, temperature
        self.views: list[View] = []
        self.view_of: list[int] = []
        for t in teachers:
            if t.view not in self.views:
                self.views.append(t.view)
            self.view_of.append(self.views.index(t.view))
            runtime.model(t.model).eval()

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @torch.no_grad()
    def logits(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each teacher's logits on its view, fp32, in the dataset's class order."""
        out = []
        with self.runtime.autocast():
            for t, v in zip(self.teachers, self.view_of):
                out.append(t.logits(self.runtime.input(views[v])).float())
                fault_point("forward")   # between one teacher's forward and the next's
        return out

    @torch.no_grad()
    def probs(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Weighted mean of the teachers' softmax(logits / T)."""
        return ensemble_probs(self.logits(views), [t.weight for t in self.teachers], self.temperature)

    @torch.no_grad()
    def probs_and_layers(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The ensemble's probabilities (:meth:`probs`, bit for bit) and each teacher's softmax(logits / T),
        from one forward pass of each teacher."""
        layers = teacher_probs(self.logits(views), self.temperature)
        return mix_probs(layers, [t.weight for t in self.teachers]), layers


@contextmanager
def naming_extra_classes(data, index, state_dict_classes):
    """A state-dict teacher with fewer outputs than DATA's classes (when --classes does not name
    them): the dataset's classes are the suspects, a misspelt CSV label making a class of its own;
    the refusal lists them and where the rarest come from."""
    try:
        yield
    except ClassCountError as e:
        if state_dict_classes is None and index.labelled and e.expected > e.found:
            raise MealV2Error(f"{e}\n{class_sources(data, index, e.expected - e.found)}") from e
        raise
