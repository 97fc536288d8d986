"""mealv2: two-stage MEAL V2 distillation (label once with a teacher ensemble, train many students).

The public API, for a training loop of your own (README, "Python API"):

- :class:`ReplayLoader`: a store's crops and soft targets per step, with every check of ``mealv2 train``;
- :func:`store_classes`: a store's class names (the student's head);
- :class:`MealV2Loss`: KD at temperature T plus MEAL V2's optional discriminator, and optionally the
  dataset's hard labels beside them;
- :func:`mix_batch`: CutMix / mixup of a batch and its stored targets (and hard labels).

Both stages as functions, each taking a config that refuses what the CLI refuses (the click commands
only build these configs):

- :func:`label` (:class:`LabelConfig`): ``mealv2 label``; returns the store;
- :func:`train` (:class:`TrainConfig`): ``mealv2 train``; returns the metrics row of every epoch;
- :func:`resume_config`: the config that continues a run from its RUN/config.json, with changes.

They are imported on first use, so ``import mealv2`` (and the CLI's start) does not pay for torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {  # name -> module defining it
    "ReplayLoader": "mealv2.stage2_train.replay",
    "store_classes": "mealv2.stage2_train.replay",
    "MealV2Loss": "mealv2.stage2_train.losses",
    "mix_batch": "mealv2.stage2_train.losses",
}

# The stages as functions: name -> (module, attribute).
_STAGES = {
    "label": ("mealv2.stage1_label.labeler", "run_label"),
    "LabelConfig": ("mealv2.stage1_label.config", "LabelConfig"),
    "train": ("mealv2.stage2_train.trainer", "train"),
    "TrainConfig": ("mealv2.stage2_train.config", "TrainConfig"),
    "resume_config": ("mealv2.stage2_train.run_config", "resume_config"),
}

__all__ = ["__version__", *_PUBLIC, *_STAGES]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    if name in _STAGES:
        module, attr = _STAGES[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mealv2' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
