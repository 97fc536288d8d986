"""`mealv2 train`."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from ..cli.options import crop_options, teacher_options
from ..cli.params import (NON_NEGATIVE, POSITIVE, POSITIVE_FLOAT, FiniteFloat, LocalPath, StorePath, device_option,
                          loader_option, trust_option, workers_option)
from .config import TrainConfig
from .run_config import config_from_flags
from .trainer import train as run_train


@click.command()
@click.argument("data", type=LocalPath(exists=True), required=False)
@click.option("--out", "-o", type=LocalPath(),
              help="Run folder: last.pt, best.pt, metrics.csv, curves.png, config.json.  [required]")
@click.option("--arch", "-a", help="Student: any timm model name.  [required]")
@click.option("--labels", "-l", type=StorePath(exists=True),
              help="Label store made by `mealv2 label` (stored-label mode): a path, or a URL (https://, s3://, "
                   "...) read through a cache under $MEALV2_CACHE.")
@click.option("--hard-labels", is_flag=True, help="Cross-entropy on the dataset labels (baselines, training teachers).")
@teacher_options()
@click.option("--temperature", type=POSITIVE_FLOAT, default=1.0, show_default=True,
              help="Online mode: softmax temperature of the teachers.")
@crop_options
@click.option("--min-res", type=POSITIVE, default=None,
              help="Progressive resizing (FFCV): the student's res up to --ramp-start, then a linear ramp to "
                   "--res at --ramp-end. Off by default.")
@click.option("--ramp-start", type=click.IntRange(min=0), default=None,
              help="With --min-res: the last epoch (from 0) at --min-res.")
@click.option("--ramp-end", type=click.IntRange(min=0), default=None,
              help="With --min-res: the first epoch at the final --res (<= --epochs).")
@click.option("--res-step", type=POSITIVE, default=None,
              help="With --min-res: the ramp's resolutions are multiples of this  [default: 32]")
@click.option("--epochs", type=POSITIVE, default=180, show_default=True,
              help="Epochs of N crops (N images), at any --crops-per-image, as MEAL V2 and FKD count them.")
@click.option("--batch-size", type=POSITIVE, default=512, show_default=True,
              help="Crops per step over all ranks (MEAL V2: 512); a multiple of crops per image x ranks.")
@click.option("--lr", type=NON_NEGATIVE, default=0.01, show_default=True)
@click.option("--momentum", type=NON_NEGATIVE, default=0.9, show_default=True)
@click.option("--wd", type=NON_NEGATIVE, default=0.0, show_default=True, help="Weight decay.")
@click.option("--opt", default="momentum", show_default=True,
              help="Any timm optimizer name (timm.optim.list_optimizers()); momentum is SGD with momentum, not "
                   "Nesterov, as MEAL V2's torch.optim.SGD (timm's sgd is Nesterov).")
@click.option("--lr-step", type=POSITIVE, default=100, show_default=True, help="lr x0.1 every this many epochs.")
@click.option("--cos", is_flag=True, help="Cosine lr schedule instead of steps.")
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=0, show_default=True, help="Linear lr warm-up.")
@click.option("--use-discriminator-loss", is_flag=True, help="Add MEAL V2's discriminator on the final outputs.")
@click.option("--d-lr", type=NON_NEGATIVE, default=0.01, show_default=True,
              help="Discriminator lr: its own SGD, momentum 0.9, constant (the original's schedule overwrote its "
                   "d_lr with --lr's).")
@click.option("--hard-label-weight", type=FiniteFloat(0, 1), default=0.0, show_default=True,
              help="Weight A of cross-entropy on the dataset's labels beside the soft targets (--labels or "
                   "--teachers): loss = A x CE(labels) + (1 - A) x (distillation [+ discriminator]). 0 is MEAL V2; "
                   "for teachers not much stronger than the student, or few images.")
@click.option("--w-cutmix", is_flag=True, help="CutMix; the target is the area-weighted mix of the crops' targets.")
@click.option("--cutmix-alpha", type=POSITIVE_FLOAT, default=1.0, show_default=True)
@click.option("--cutmix-prob", type=FiniteFloat(0, 1), default=1.0, show_default=True)
@click.option("--mixup", type=NON_NEGATIVE, default=0.0, show_default=True,
              help="Mixup Beta alpha (0 = off); on steps without CutMix.")
@click.option("--model-ema", is_flag=True,
              help="Also keep an exponential moving average of the weights (timm's ModelEmaV3), validated beside "
                   "them (val_ema_* in metrics.csv) and saved in the checkpoints (`eval --ema`, `export --ema`).")
@click.option("--model-ema-decay", type=FiniteFloat(0, 1, max_open=True), default=0.9998, show_default=True,
              help="With --model-ema: the share of the average kept per step; it averages over about 1 / (1 - D) "
                   "steps (timm's default: 5,000; a short run wants a few percent of its steps).")
@click.option("--val", type=LocalPath(exists=True), help="Validation ImageFolder/CSV; best.pt keeps the best top-1.")
@click.option("--pretrained", is_flag=True, help="Start from timm's pretrained weights (as MEAL V2 does).")
@click.option("--init", type=LocalPath(exists=True), help="Start from a checkpoint or state dict.")
@click.option("--resume", is_flag=False, flag_value="", default=None, metavar="[RUN]", type=LocalPath(),
              help="Continue RUN (default --out) exactly, with the settings in RUN/config.json; flags typed "
                   "change them where a run may change (--epochs without --cos, --workers, ...).")
@loader_option
@device_option
@workers_option
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the student.")
@click.option("--tensorboard", is_flag=True, help="Also write TensorBoard events to RUN/tensorboard.")
@click.option("--dry-run", is_flag=True,
              help="Do every start-up check (data, store, classes, teachers, model, resume), print the plan, exit.")
@trust_option
@click.pass_context
def train(ctx, **flags):
    """Train a timm student on DATA from a label store (--labels), dataset labels (--hard-labels)
    or teachers run online (--teachers).

    The crop flags (--res, --scale, --ratio, --crops-per-image) shape the fresh crops of
    --hard-labels and --teachers; with --labels the store's crops are replayed, and --scale,
    --ratio or --crops-per-image differing from the store's is refused. --res is the student's
    resolution in every mode; with --labels it defaults to the store's and may differ from it
    (the stored boxes are relative). Validation and checkpoints use the final --res.

    A run writes its settings to RUN/config.json; `--resume RUN` (or `--out RUN --resume`) takes
    them all from there: type only what you mean to change (e.g. --epochs).
    """
    typed = {name for name in flags if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT}
    _run(config_from_flags(flags, typed))


def _run(cfg: TrainConfig) -> None:
    """Run ``cfg``; on Ctrl-C, say how to continue from the last checkpoint (the user will want to)."""
    try:
        run_train(cfg)
    except KeyboardInterrupt:
        last = Path(cfg.out) / "last.pt"
        if last.is_file() and not cfg.dry_run and os.environ.get("RANK", "0") == "0":   # once, not per rank
            args = [a for a in sys.argv[1:] if a != "--resume"]
            click.echo(f"\nmealv2 train: interrupted; {last} holds the last finished epoch. Continue the run "
                       f"with:\n  {shlex.join(['mealv2', *args, '--resume'])}", err=True)
        raise
