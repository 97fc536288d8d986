"""`mealv2 train`."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from ..common.cli_options import (NON_NEGATIVE, POSITIVE, POSITIVE_FLOAT, FiniteFloat, LocalPath, StorePath,
                                  crop_options, crop_params, device_option, loader_option, teacher_options, trust_option,
                                  workers_option)
from ..common.teachers import split_specs
from .trainer import CROP_FLAGS, TrainConfig, train as run_train


@click.command()
@click.argument("data", type=LocalPath(exists=True))
@click.option("--out", "-o", required=True, type=LocalPath(),
              help="Run folder: last.pt, best.pt, metrics.csv, curves.png.")
@click.option("--arch", "-a", required=True, help="Student: any timm model name.")
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
@click.option("--resume", is_flag=True, help="Continue RUN/last.pt exactly (repeat the run's flags).")
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
def train(ctx, data, out, arch, labels, hard_labels, teachers, classes_file, teacher_classes, teacher_check,
          teacher_precision,
          temperature, res, scale, ratio, crops_per_image, min_res, ramp_start, ramp_end, res_step, epochs,
          batch_size, lr, momentum, wd, opt, lr_step, cos,
          warmup_epochs, use_discriminator_loss, d_lr, w_cutmix, cutmix_alpha, cutmix_prob, mixup, model_ema,
          model_ema_decay, val, pretrained,
          init, resume, loader, device, workers, seed, compile_, tensorboard, dry_run):
    """Train a timm student on DATA from a label store (--labels), dataset labels (--hard-labels)
    or teachers run online (--teachers).

    The crop flags (--res, --scale, --ratio, --crops-per-image) shape the fresh crops of
    --hard-labels and --teachers; with --labels the store's crops are replayed, and --scale,
    --ratio or --crops-per-image differing from the store's is refused. --res is the student's
    resolution in every mode; with --labels it defaults to the store's and may differ from it
    (the stored boxes are relative). Validation and checkpoints use the final --res.
    """
    teachers = split_specs(teachers)
    if sum([bool(labels), hard_labels, bool(teachers)]) != 1:
        raise click.UsageError("give exactly one of --labels STORE, --hard-labels, --teachers SPEC")
    if use_discriminator_loss and hard_labels:
        raise click.UsageError("--use-discriminator-loss needs soft targets (--labels or --teachers)")
    if ctx.get_parameter_source("temperature") is not ParameterSource.DEFAULT and not teachers:
        raise click.UsageError("--temperature applies to online mode (--teachers) only; a store's temperature "
                               "is the one it was labelled with")
    for name in ("classes_file", "teacher_classes", "teacher_precision"):
        if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT and not teachers:
            raise click.UsageError(f"--{name.replace('_file', '').replace('_', '-')} applies to online mode "
                                   f"(--teachers) only")
    if ctx.get_parameter_source("model_ema_decay") is not ParameterSource.DEFAULT and not model_ema:
        raise click.UsageError("--model-ema-decay applies with --model-ema only")
    if pretrained and init:
        raise click.UsageError("--pretrained and --init both set the starting weights; give one")
    given = tuple(name for name in CROP_FLAGS
                  if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT)
    _run(TrainConfig(
        data=data, out=out, arch=arch, labels=labels, hard_labels=hard_labels, teachers=teachers,
        classes_file=classes_file, teacher_classes=teacher_classes, teacher_check=teacher_check,
        teacher_precision=teacher_precision,
        temperature=temperature, crop=crop_params(res, scale, ratio), crops_per_image=crops_per_image,
        crop_given=given, min_res=min_res, ramp_start=ramp_start, ramp_end=ramp_end, res_step=res_step,
        epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, wd=wd, opt=opt,
        lr_step=lr_step, cos=cos, warmup_epochs=warmup_epochs, use_discriminator_loss=use_discriminator_loss,
        d_lr=d_lr, w_cutmix=w_cutmix, cutmix_alpha=cutmix_alpha, cutmix_prob=cutmix_prob, mixup=mixup,
        model_ema=model_ema, model_ema_decay=model_ema_decay, val=val,
        pretrained=pretrained, init=init, resume=resume, loader=loader, device=device, workers=workers,
        seed=seed, compile=compile_, tensorboard=tensorboard, dry_run=dry_run))


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
