"""What a run leaves in RUN/: config.json, metrics.csv, curves.png and optionally TensorBoard events."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import time
from pathlib import Path

from ..common.errors import MealV2Error
from ..common.store.files import write_file

# res: the student's input resolution that epoch (progressive resizing changes it).
# val_ema_*: the --model-ema weights' scores (empty without it).
METRICS = ("epoch", "res", "lr", "loss", "d_loss", "val_top1", "val_top5", "val_ema_top1", "val_ema_top5",
           "img_per_s", "crops_seen")
# curves.png is redrawn at most this often (and after the last epoch): drawing costs 0.1-0.7 s,
# more than a whole epoch of a small run; metrics.csv is rewritten every epoch.
PLOT_EVERY_S = 30.0
CONFIG_FILE = "config.json"
RUN_LOCK = "train.lock"   # in RUN, held by the one `mealv2 train` writing it


def write_run_config(run: Path, cfg, resolved: dict) -> Path:
    """RUN/config.json, whole and durably (common/store/files.py): ``settings`` (every field of the TrainConfig
    ``cfg``, typed or default: what --resume continues with, run_config.py), ``resolved`` (what they came to: the
    store's crops, the student's res per epoch, ...) and ``cwd``, the folder relative paths among them are in."""
    path = run / CONFIG_FILE
    text = json.dumps({"settings": dataclasses.asdict(cfg), "resolved": resolved, "cwd": os.getcwd()},
                      indent=1) + "\n"
    write_file(path, text.encode(), sole_writer=True)
    return path


class RunLog:
    """Rewrites metrics.csv and curves.png from all rows so far (rows survive --resume in last.pt)."""

    def __init__(self, run: Path, tensorboard: bool = False):
        self.run = run
        self.plotted = float("-inf")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise MealV2Error(f"--tensorboard needs the tensorboard package ({e}); "
                                  f"pip install tensorboard") from e
            self.tb = SummaryWriter(run / "tensorboard")

    def write(self, rows: list[dict], final: bool = False) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, METRICS)
        writer.writeheader()
        # .get: rows resumed from a checkpoint written before a column existed leave it empty
        writer.writerows({k: ("" if row.get(k) is None else row[k]) for k in METRICS} for row in rows)
        write_file(self.run / "metrics.csv", text.getvalue().encode(), sole_writer=True)
        if final or time.monotonic() - self.plotted >= PLOT_EVERY_S:
            plot_curves(rows, self.run / "curves.png")
            self.plotted = time.monotonic()
        if self.tb is not None:
            row = rows[-1]
            for key in METRICS[1:]:
                if row.get(key) is not None:
                    self.tb.add_scalar(key, row[key], row["epoch"])
            self.tb.flush()


def plot_curves(rows: list[dict], path: Path) -> None:
    """Training loss (and discriminator loss) and validation accuracy against epochs."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows]
    for key in ("loss", "d_loss"):
        points = [(e, r[key]) for e, r in zip(epochs, rows) if r[key] is not None]
        if points:
            loss_ax.plot(*zip(*points), marker=".", label=key)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="loss")
    loss_ax.legend()
    for key in ("val_top1", "val_top5", "val_ema_top1", "val_ema_top5"):
        points = [(e, r[key]) for e, r in zip(epochs, rows) if r.get(key) is not None]
        if points:
            acc_ax.plot(*zip(*points), marker=".", label=key)
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="validation")
    if acc_ax.lines:
        acc_ax.legend()
    else:
        acc_ax.text(0.5, 0.5, "no --val", ha="center", va="center", transform=acc_ax.transAxes)
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(path, dpi=100)
