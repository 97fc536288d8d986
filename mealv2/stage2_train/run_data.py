"""What a run records of the images it trains and validates on, and the resume check against it.

Every checkpoint records DATA's and --val's index (common/data/dataset.index_record: fingerprint, count,
relative paths), in every mode. The checkpoint, not RUN/config.json, is what ``--resume`` compares: it is
the state being continued (its weights were trained on exactly those images, as of its epoch), it is read
by every resume anyway, and config.json is rewritten at each start. config.json gets the fingerprints
too, for people reading it.

The record is of the index's content, not of where it lives, so data moved or copied elsewhere resumes.
Other DATA would continue the run on other images (with --hard-labels or --teachers nothing else would
notice, if the classes match); another --val would let best.pt's choice compare top-1 scores of two val
sets. Both are refused, naming the files that changed; a run with no --val may add one.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..common.data.dataset import DatasetIndex, index_changes, index_record
from ..common.errors import MealV2Error

RECORD_KEY = "datasets"   # the checkpoint's key: {"data": index_record, "val": index_record or None}


def run_data_record(data: DatasetIndex, val: DatasetIndex | None) -> dict:
    """What a checkpoint records of the run's DATA and --val (None without one)."""
    return {"data": index_record(data), "val": index_record(val) if val is not None else None}


def record_summary(record: dict) -> dict:
    """The record as config.json shows it: each set's fingerprint and image count, not its paths."""
    return {name: None if r is None else {k: r[k] for k in ("fingerprint", "num_images")} for name, r in record.items()}


def check_run_data(ckpt: dict, path: Path, settings: dict, data: DatasetIndex, val: DatasetIndex | None, *,
                   data_arg: str, val_arg: str | None, warn: bool) -> None:
    """Refuse to continue the run of ``ckpt`` (read from ``path``, started with ``settings``) on DATA ``data``
    or --val ``val`` other than the ones it recorded, naming the files each lacks and adds. A checkpoint saved
    before the record existed resumes with a warning (printed where ``warn``: on one rank)."""
    recorded = ckpt.get(RECORD_KEY)
    if recorded is None:
        if warn:
            print(f"mealv2: warning: {path} was saved by a mealv2 that did not record the run's images, so DATA "
                  f"{data_arg} cannot be checked against them; resuming (checkpoints saved from now on record them)",
                  file=sys.stderr)
        return
    found = [(f"DATA {data_arg}", "DATA", data, recorded["data"]), (f"--val {val_arg}", "--val", val, recorded["val"])]
    changes = [f"{shown}: {change}" for shown, name, index, record in found
               if index is not None and record is not None and (change := index_changes(record, index, name))]
    if not changes:
        return
    was = f"DATA {settings.get('data')}" + (f" and --val {settings['val']}" if settings.get("val") else "")
    raise MealV2Error(f"--resume {path}: this command's images are not the run's (compared by relative path and "
                      f"content, wherever they are):\n  " + "\n  ".join(changes)
                      + f"\nPass the images the run was started with ({was}, or a copy of them elsewhere), or start "
                        f"a new run with another --out (a different --val is refused too: best.pt is picked by "
                        f"the val top-1 of every epoch, which must score one val set)")
