"""A config's fields as click options: the flag of the same name, with the type, default and parsing its
declaration gives (common/config.py), so a command only adds the help; and the groups label and train
share (crops, teachers)."""
from __future__ import annotations

import dataclasses

import click

from ..common.config import ClassFiles, Flag, Specs, flag_name, word
from ..common.models.teachers import split_specs
from .params import LocalPath, flag_type


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


def _flag(flag, kind, default, checks) -> tuple[str, dict]:
    """A bool: --name, or --name/--no-name when it is on by default."""
    return (f"{flag}/--no-{flag[2:]}" if default else flag,
            {"is_flag": True, "default": default, "show_default": bool(default)})


def _specs(flag, kind, default, checks) -> tuple[str, dict]:
    """Teacher specs: repeatable and comma separated."""
    return flag, {"multiple": True, "callback": lambda ctx, param, values: split_specs(values)}


def _class_files(flag, kind, default, checks) -> tuple[str, dict]:
    return flag, {"multiple": True, "metavar": "N=FILE", "callback": _teacher_classes}


def _valued(flag, kind, default, checks) -> tuple[str, dict]:
    shown = getattr(kind, "means", None) if default is None else None if callable(default) else word(default)
    return flag, {"type": flag_type(kind, **checks), "default": default, "show_default": shown}


OPTION_FORMS = {Flag: _flag, Specs: _specs, ClassFiles: _class_files}   # any other kind takes a value


def _field(config, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(config) if f.name == name)


def config_option(config, name: str, *aliases: str, checks: dict | None = None, **kwargs):
    """The click option of field ``name`` of the config class ``config``: its flag (common.config.flag_name),
    type and default from the field's declaration; ``aliases`` (-o), ``checks`` (click.Path's exists=, ...)
    and ``kwargs`` (help, required) are the command's."""
    field = _field(config, name)
    kind = field.metadata["setting"]
    default = field.default if field.default is not dataclasses.MISSING else (
        None if field.default_factory is dataclasses.MISSING else field.default_factory)
    flag, attrs = OPTION_FORMS.get(type(kind), _valued)(flag_name(name), kind, default, checks or {})
    return click.option(flag, *aliases, name, **attrs, **kwargs)


def config_options(config, helps: dict):
    """The click options of the fields ``helps`` names (field: its flag's help or None), in that order."""
    return stack([config_option(config, name, help=text) for name, text in helps.items()])


def config_argument(config, name: str, *, required: bool = True, **checks):
    """The click argument of field ``name`` of ``config`` (DATA); ``checks``: click.Path's (exists=, ...)."""
    return click.argument(name, type=flag_type(_field(config, name).metadata["setting"], **checks),
                          required=required)


def stack(options: list):
    """One decorator applying ``options`` in the order listed (as --help shows them)."""
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


CROP_HELP = {
    "res": "Side of the square crop fed to the network.",
    "scale": "Range of the crop's area relative to the image (RandomResizedCrop).",
    "ratio": "Range of the crop's aspect ratio (RandomResizedCrop).",
    "crops_per_image": "Crops cut from one decoded image (FKD's num_crops).",
}


def crop_options(config):
    """--res, --scale, --ratio, --crops-per-image: the random-resized-crop distribution, as ``config`` declares
    them."""
    return config_options(config, CROP_HELP)


def teacher_options(config, required: bool = False):
    """--teachers, --classes, --teacher-classes, --teacher-check, --teacher-precision: who teaches and how they
    see their input (common/models/teachers.py has the rule)."""
    return stack([
        config_option(config, "teachers", "-t", required=required,
                      help="ARCH (timm pretrained) | ARCH=CKPT (state dict, runs at --res, imagenet mean/std) | "
                           "CKPT (mealv2 checkpoint); suffixes @RES, %NORM (imagenet, 0.5, clip, none, timm, "
                           "M:M:M/S:S:S), *WEIGHT; repeatable or comma separated."),
        config_option(config, "classes_file", checks={"exists": True, "dir_okay": False},
                      help="State-dict teachers' class names in their output order, one per line: mapped by "
                           "name onto the dataset's classes, or the store's classes for unlabelled images."),
        config_option(config, "teacher_classes",
                      help="Teacher N's class names in its output order, one per line (N from 1, in --teachers "
                           "order; repeatable). Any kind of teacher; for it, overrides --classes and what a "
                           "checkpoint or timm records. The teacher check writes such files and prints the command."),
        config_option(config, "teacher_check",
                      help="On labelled data, stop when a teacher agrees clearly better with the labels under "
                           "another normalisation or class order than configured."),
        config_option(config, "teacher_precision",
                      help="Teachers' forward precision; fp32 keeps their rounding below the store's encoding "
                           "error (bf16 does not: BENCHMARKS.md)."),
    ])
