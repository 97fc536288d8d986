"""`mealv2 train`: its flags are TrainConfig's fields, with the types, ranges and defaults declared there."""
from __future__ import annotations

from functools import partial

import click
from click.core import ParameterSource

from ..cli.options import config_argument, config_option, config_options, crop_options, teacher_options
from ..cli.params import LocalPath, device_option, loader_option, trust_option, workers_option
from .config import TrainConfig
from .run_config import config_from_flags
from .trainer import train as run_train

option = partial(config_option, TrainConfig)   # the flag of a TrainConfig field
RAMP = {  # field: its flag's help, in --help's order
    "min_res": "Progressive resizing (FFCV): the student's res up to --ramp-start, then a linear ramp to --res at "
               "--ramp-end. Off by default.",
    "ramp_start": "With --min-res: the last epoch (from 0) at --min-res.",
    "ramp_end": "With --min-res: the first epoch at the final --res (<= --epochs).",
    "res_step": "With --min-res: the ramp's resolutions are multiples of this  [default: 32]",
}
RECIPE = {
    "epochs": "Epochs of N crops (N images), at any --crops-per-image, as MEAL V2 and FKD count them.",
    "batch_size": "Crops per step over all ranks (MEAL V2: 512); a multiple of crops per image x ranks.",
    "lr": None, "momentum": None, "wd": "Weight decay.",
    "opt": "Any timm optimizer name (timm.optim.list_optimizers()); momentum is SGD with momentum, not Nesterov, as "
           "MEAL V2's torch.optim.SGD (timm's sgd is Nesterov).",
    "lr_step": "lr x0.1 every this many epochs.",
    "cos": "Cosine lr schedule instead of steps.",
    "warmup_epochs": "Linear lr warm-up.",
    "use_discriminator_loss": "Add MEAL V2's discriminator on the final outputs.",
    "d_lr": "Discriminator lr: its own SGD, momentum 0.9, constant (the original's schedule overwrote its d_lr "
            "with --lr's).",
    "hard_label_weight": "Weight A of cross-entropy on the dataset's labels beside the soft targets (--labels or "
                         "--teachers): loss = A x CE(labels) + (1 - A) x (distillation [+ discriminator]). 0 is "
                         "MEAL V2; for teachers not much stronger than the student, or few images.",
    "w_cutmix": "CutMix; the target is the area-weighted mix of the crops' targets.",
    "cutmix_alpha": None, "cutmix_prob": None,
    "mixup": "Mixup Beta alpha (0 = off); on steps without CutMix.",
    "model_ema": "Also keep an exponential moving average of the weights (timm's ModelEmaV3), validated beside them "
                 "(val_ema_* in metrics.csv) and saved in the checkpoints (`eval --ema`, `export --ema`).",
    "model_ema_decay": "With --model-ema: the share of the average kept per step, below 1; it averages over about "
                       "1 / (1 - D) steps (timm's default: 5,000; a short run wants a few percent of its steps).",
}
EXECUTION = {
    "seed": None,
    "compile": "torch.compile the student.",
    "tensorboard": "Also write TensorBoard events to RUN/tensorboard.",
    "dry_run": "Do every start-up check (data, store, classes, teachers, model, resume), print the plan, exit.",
    "progress": "Progress bars on stderr.",
}


@click.command()
@config_argument(TrainConfig, "data", exists=True, required=False)
@option("out", "-o", help="Run folder: last.pt, best.pt, metrics.csv, curves.png, config.json.  [required]")
@option("arch", "-a", help="Student: any timm model name.  [required]")
@option("labels", "-l", checks={"exists": True},
        help="Label store made by `mealv2 label` (stored-label mode): a path, or a URL (https://, s3://, ...) read "
             "through a cache under $MEALV2_CACHE.")
@option("teacher_weights",
        help="With --labels: train from the store's per-teacher layers (`mealv2 label --keep-teachers`) averaged "
             "with these weights, one per layer in the store's teacher order (`mealv2 inspect` lists them; layers "
             "past the list weigh 0), e.g. 0,1 = teacher 2 alone; instead of the stored ensemble.")
@option("hard_labels", help="Cross-entropy on the dataset labels (baselines, training teachers).")
@teacher_options(TrainConfig)
@option("temperature", help="Online mode: softmax temperature of the teachers.")
@crop_options(TrainConfig)
@config_options(TrainConfig, RAMP)
@config_options(TrainConfig, RECIPE)
@option("val", checks={"exists": True}, help="Validation ImageFolder/CSV; best.pt keeps the best top-1.")
@option("pretrained", help="Start from timm's pretrained weights (as MEAL V2 does).")
@option("init", checks={"exists": True}, help="Start from a checkpoint or state dict.")
@click.option("--resume", is_flag=False, flag_value="", default=None, metavar="[RUN]", type=LocalPath(),
              help="Continue RUN (default --out) exactly, with the settings in RUN/config.json; flags typed "
                   "change them where a run may change (--epochs without --cos, --workers, ...).")
@loader_option
@device_option
@workers_option
@config_options(TrainConfig, EXECUTION)
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
    run_train(config_from_flags(flags, typed))
