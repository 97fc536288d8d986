"""Option groups shared by the commands that label and train: crops, teachers, and a config printed
back as the command that builds it."""
from __future__ import annotations

import dataclasses

import click

from ..common.config import field_defaults, flag_name
from ..common.data.crops import CropParams
from ..common.models.runtime import PRECISIONS
from .params import POSITIVE, LocalPath, float_pair


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




# ---- configs as flags: LabelConfig/TrainConfig fields are the flags of the same name ------------------------
NOT_FLAGS = ("progress", "write_depth", "crop_given", "resume")   # set by callers, not typed
ALWAYS_GIVEN = ("workers",)   # its default is the machine's, so a command given elsewhere states it


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
