"""RUN/config.json: a run's settings, so ``--resume`` continues it from the run alone.

``mealv2 train`` writes every setting of the run (typed or default) and what it resolved them to
(the store's crops and temperature, the student's res per epoch, ...) at start. A resume builds its
config from the run's settings and the flags the user typed: nothing untyped can change, and a typed
flag that would change what the run computes is refused by the trainer's resume check, naming it.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from ..common.data.crops import CROP_FLAGS
from ..common.errors import MealV2Error
from ..common.models.checkpoints import load_checkpoint_file
from ..common.store.objects import is_url
from .config import TRAIN_DEFAULTS, TrainConfig
from .utils import CONFIG_FILE


def run_settings(run: str | Path) -> dict:
    """The settings a run was made with: RUN/config.json, or the train_config its last.pt records (the
    same settings, as of its last epoch) for runs made before config.json existed or whose copy is damaged."""
    run = Path(run)
    path, last = run / CONFIG_FILE, run / "last.pt"
    if path.is_file():
        try:
            settings = json.loads(path.read_text())["settings"]
            if isinstance(settings, dict):
                return current_settings(settings)
            damage = f"its settings are a {type(settings).__name__}, not a mapping"
        except (ValueError, KeyError, TypeError) as e:
            damage = f"{type(e).__name__}: {e}"
        if not last.is_file():
            raise MealV2Error(f"--resume: {path} is not a mealv2 run config ({damage}) and {run} holds no last.pt, "
                              f"so no epoch was saved: restore {path} from a copy, or start the run again without "
                              f"--resume (its --out {run} is free)")
        print(f"mealv2: {path} is not a mealv2 run config ({damage}); continuing with the settings {last} records "
              f"(those of its last epoch), and the run writes {path} again", file=sys.stderr)
    if last.is_file():
        return current_settings(load_checkpoint_file(last).get("train_config", {}))
    raise MealV2Error(f"--resume {run}: neither {path} nor {last} exists, so there is no run to continue; "
                      f"start it without --resume")


def current_settings(settings: dict) -> dict:
    """A run's recorded settings as TrainConfig's fields are now: runs made before the crop settings became
    fields of their own recorded a whole ``crop`` and the crop flags typed (``crop_given``); with --labels only
    those were the run's, the rest were the store's."""
    if "crop" not in settings:
        return settings
    settings = dict(settings)
    crop, given = settings.pop("crop"), settings.pop("crop_given", ())
    stored = bool(settings.get("labels"))
    settings.update({name: tuple(crop[name]) if isinstance(crop[name], list) else crop[name]
                     for name in CROP_FLAGS if name in given or not stored})
    if stored and "crops_per_image" not in given:
        settings["crops_per_image"] = None
    return settings


def resume_config(run: str | Path, **changes) -> TrainConfig:
    """The config that continues ``run``: its settings (RUN/config.json) with ``changes`` applied.

    Args:
        run: the run folder (``out`` of the run to continue).
        **changes: TrainConfig fields to change. Only where a run may change (``epochs`` without ``cos``,
            ``workers``, ``device``, ``data``'s location, ...); :func:`train` refuses any other
            difference from the run, naming it.

    Example::

        mealv2.train(mealv2.resume_config("runs/r18", epochs=8))
    """
    settings = run_settings(run)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {**dict.fromkeys(known), **TRAIN_DEFAULTS, **{k: v for k, v in settings.items() if k in known}}
    values.update(_located(values, started_in(run)))
    # JSON gives lists and string keys back
    values.update({name: tuple(values[name]) for name in ("scale", "ratio") if values[name] is not None},
                  teacher_classes={int(n): path for n, path in values["teacher_classes"].items()})
    return TrainConfig(**{**values, "out": str(run), "resume": True, **changes})


# The recorded paths a resume reads where the run was started (they may change on resume: RESUME_MAY_CHANGE).
LOCATED = ("data", "labels", "val", "init")


def started_in(run: str | Path) -> str | None:
    """The folder ``run`` was started in (RUN/config.json's ``cwd``); None for a run that did not record it."""
    try:
        cwd = json.loads((Path(run) / CONFIG_FILE).read_text()).get("cwd")
    except (OSError, ValueError, AttributeError):
        return None
    return cwd if isinstance(cwd, str) else None


def _located(values: dict, cwd: str | None) -> dict:
    """The run's relative local paths (data, labels, ...) joined to ``cwd``, the folder they were given in: a
    resume from another folder reads the run's files, not others of the same name (or none) there."""
    if cwd is None or Path(cwd) == Path.cwd():
        return {}
    return {name: str(Path(cwd) / values[name]) for name in LOCATED
            if isinstance(values[name], str) and values[name] and not is_url(values[name])
            and not Path(values[name]).is_absolute()}


def config_from_flags(flags: dict, typed: set[str]) -> TrainConfig:
    """The config of a ``mealv2 train`` command: ``flags`` are all its parameters, ``typed`` the ones the
    user gave. With --resume [RUN] every setting is the run's (RUN/config.json) except the typed ones."""
    flags = dict(flags)
    resume = flags.pop("resume")
    if resume is None:
        return TrainConfig(**flags)
    if resume and "out" in typed and Path(flags["out"]) != Path(resume):
        raise MealV2Error(f"--resume {resume} and --out {flags['out']} name two runs; give one")
    run = resume or flags["out"]
    if not run:
        raise MealV2Error("--resume: give the run to continue, --resume RUN (or --out RUN --resume)")
    return resume_config(run, **{k: v for k, v in flags.items() if k in typed and k != "out"})
