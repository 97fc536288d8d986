"""Click options shared by several commands, so a flag means the same thing everywhere."""
from __future__ import annotations

import dataclasses
import math
import os
from fractions import Fraction

import click

from .crops import CropParams
from .errors import MealV2Error
from .loaders import LOADER_CHOICES
from .lease import writable_url
from .remote import READ_BY, check_url, is_url, redact

POSITIVE = click.IntRange(min=1)
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")   # forward precisions (common/runtime.py applies them)


class FiniteFloat(click.FloatRange):
    """A float flag (optionally bounded, as click.FloatRange) that refuses nan and inf: click's own
    float type takes them, and every comparison with nan is false, so a range never stops it."""

    name = "finite float"

    def convert(self, value, param, ctx):
        rv = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value} is not a finite number; expected a finite float"
                      + (f" in {self._describe_range()}" if self.min is not None or self.max is not None else ""),
                      param, ctx)
        return super().convert(rv, param, ctx)


FINITE = FiniteFloat()
NON_NEGATIVE = FiniteFloat(min=0)
POSITIVE_FLOAT = FiniteFloat(min=0, min_open=True)


def float_pair(value: str) -> tuple[float, float]:
    """'MIN,MAX' with decimals or fractions ('3/4,4/3' is exactly torchvision's ratio range)."""
    try:
        lo, hi = (float(Fraction(v.strip())) for v in value.split(","))
    except (ValueError, ZeroDivisionError):
        raise click.BadParameter(f"expected two numbers 'MIN,MAX', got '{value}'") from None
    return lo, hi


def _float_pair(ctx, param, value):
    return float_pair(value)


def _teacher_classes(ctx, param, values) -> dict[int, str]:
    """Repeated 'N=FILE' -> {N: FILE}: teacher N's class names, one per line, in output order."""
    out = {}
    for value in values:
        n, _, path = value.partition("=")
        if not n.strip().isdigit() or not path:
            raise click.BadParameter(f"expected N=FILE (N: the teacher's position in --teachers, from 1), "
                                     f"got '{value}'")
        if int(n) in out:
            raise click.BadParameter(f"teacher {int(n)} is given twice ({out[int(n)]}, {path})")
        out[int(n)] = LocalPath(exists=True, dir_okay=False).convert(path, param, ctx)
    return out


class LocalPath(click.Path):
    """click.Path that refuses URLs: ``--out s3://b/x.zarr`` would otherwise become the local
    folder ``s3:/b/x.zarr`` without a word. Data, runs and checkpoints are local or mounted paths."""

    def convert(self, value, param, ctx):
        if is_url(value):
            self.fail(f"{redact(value)} is a URL; here mealv2 takes a local path: URLs are taken only as label stores "
                      f"({READ_BY}). Mount it (e.g. s3fs, gcsfuse) or copy it, and pass the local path",
                      param, ctx)
        return super().convert(value, param, ctx)


class StorePath(LocalPath):
    """A label store to read: a local path, or a URL (https://, s3://, other fsspec protocols) that
    common/remote.py reads through its cache; ``write``: to write, a local path or a URL whose
    protocol has a lease (common/lease.py: s3://)."""

    def __init__(self, *args, write: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.write = write

    def convert(self, value, param, ctx):
        if not is_url(value):
            return super().convert(value, param, ctx)
        try:
            return writable_url(value, MealV2Error) if self.write else check_url(value)
        except MealV2Error as e:
            self.fail(str(e), param, ctx)


def _stack(options: list):
    """One decorator applying ``options`` in the order listed (as --help shows them)."""
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


crop_options = _stack([
    click.option("--res", type=POSITIVE, default=224, show_default=True,
                 help="Side of the square crop fed to the network."),
    click.option("--scale", default="0.08,1", show_default=True, callback=_float_pair,
                 help="Range of the crop's area relative to the image (RandomResizedCrop)."),
    click.option("--ratio", default="3/4,4/3", show_default=True, callback=_float_pair,
                 help="Range of the crop's aspect ratio (RandomResizedCrop)."),
    click.option("--crops-per-image", "crops_per_image", type=POSITIVE, default=4, show_default=True,
                 help="Crops cut from one decoded image (FKD's num_crops)."),
])
"""--res, --scale, --ratio, --crops-per-image: the random-resized-crop distribution."""


def crop_params(res: int, scale, ratio) -> CropParams:
    try:
        return CropParams(res=res, scale=tuple(scale), ratio=tuple(ratio))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def teacher_options(required: bool = False):
    """--teachers, --classes, --no-teacher-check, --teacher-precision: who teaches and how they see
    their input (common/teachers.py has the rule)."""
    return _stack([
        click.option("--teachers", "-t", multiple=True, required=required,
                     help="ARCH (timm pretrained) | ARCH=CKPT (state dict, runs at --res, imagenet mean/std) | "
                          "CKPT (mealv2 checkpoint); suffixes @RES, %NORM (imagenet, 0.5, clip, none, timm, "
                          "M:M:M/S:S:S), *WEIGHT; repeatable or comma separated."),
        click.option("--classes", "classes_file", type=LocalPath(exists=True, dir_okay=False),
                     help="State-dict teachers' class names in their output order, one per line: mapped by "
                          "name onto the dataset's classes, or the store's classes for unlabelled images."),
        click.option("--teacher-classes", "teacher_classes", multiple=True, metavar="N=FILE",
                     callback=_teacher_classes,
                     help="Teacher N's class names in its output order, one per line (N from 1, in --teachers "
                          "order; repeatable). Any kind of teacher; for it, overrides --classes and what a "
                          "checkpoint or timm records. The teacher check writes such files and prints the command."),
        click.option("--teacher-check/--no-teacher-check", default=True, show_default=True,
                     help="On labelled data, stop when a teacher agrees clearly better with the labels under "
                          "another normalisation or class order than configured."),
        click.option("--teacher-precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                     help="Teachers' forward precision; fp32 keeps their rounding below the store's encoding "
                          "error (bf16 does not: BENCHMARKS.md)."),
    ])


device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                             show_default=True, help="auto = CUDA when present.")


def available_cores() -> int:
    """The cores this process may run on (its affinity, as a container or taskset limits it): the
    default number of decoding workers, so a 2-core machine does not start 4 of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


workers_option = click.option("--workers", type=POSITIVE, default=available_cores,
                              show_default="the cores this process may use", help="Decoding threads.")
loader_option = click.option("--loader", type=click.Choice(LOADER_CHOICES), default="auto", show_default=True,
                             help="Crop loader: auto = DALI where installed, else torch (README: which runs where).")


def _trust(ctx, param, value):
    if value:   # the default (untrusted) needs nothing, nor torch imported
        from .models import trusting_checkpoints
        ctx.with_resource(trusting_checkpoints())


trust_option = click.option(
    "--trust-checkpoint", is_flag=True, expose_value=False, callback=_trust,
    help="Unpickle checkpoint files in full, for files you made or trust the source of: by default only "
         "tensors and plain data are read from them, since a crafted pickle runs code as it loads.")
"""--trust-checkpoint: the command loads every checkpoint file (teachers, --init, --resume, eval's, export's)
in full (common/models.py)."""


# ---- configs as flags: LabelConfig/TrainConfig fields are the flags of the same name ------------------------
NOT_FLAGS = ("progress", "write_depth", "crop_given", "resume")   # set by callers, not typed
ALWAYS_GIVEN = ("workers",)   # its default is the machine's, so a command given elsewhere states it
FLAG_NAMES = {"classes_file": "--classes", "data": "DATA"}


def field_defaults(cls) -> dict:
    """A dataclass's default per field (factories called): what an untyped flag means."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def flag_name(name: str) -> str:
    """A config field's flag: classes_file -> --classes, w_cutmix -> --w-cutmix."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def config_args(cfg) -> list[str]:
    """The arguments of the `mealv2` command that builds ``cfg`` (a LabelConfig or TrainConfig): DATA, then
    every setting that differs from its default (and the crop flags a TrainConfig's crop_given names), so a
    report can print the command equivalent to a Python call."""
    defaults, typed = field_defaults(type(cfg)), getattr(cfg, "crop_given", ())
    args = [str(cfg.data)]
    for f in dataclasses.fields(cfg):
        name, value = f.name, getattr(cfg, f.name)
        if name == "data" or name in NOT_FLAGS or (name in defaults and value == defaults[name] and name not in
                                                   ("crop", *ALWAYS_GIVEN, *typed)):
            continue
        if name == "crop":
            for key in ("res", "scale", "ratio"):
                if getattr(value, key) != getattr(defaults["crop"], key) or key in typed:
                    shown = getattr(value, key)
                    args += [f"--{key}", ",".join(map(str, shown)) if isinstance(shown, tuple) else str(shown)]
        elif isinstance(value, bool):
            args.append(flag_name(name) if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, (list, tuple)):
            args += [flag_name(name), ",".join(value)]
        elif isinstance(value, dict):
            for n, path in value.items():
                args += [flag_name(name), f"{n}={path}"]
        elif value is not None:
            args += [flag_name(name), str(value)]
    return args
