"""`mealv2 label`."""
from __future__ import annotations

import click

from ..cli.options import crop_options, crop_params, teacher_options
from ..cli.params import (POSITIVE, POSITIVE_FLOAT, LocalPath, StorePath, device_option, loader_option, trust_option,
                          workers_option)

# The labeller (torch, timm, DALI) is imported when `label` runs: `--help` stays quick.


@click.command()
@click.argument("data", type=LocalPath(exists=True))
@teacher_options(required=True)
@click.option("--out", "-o", required=True, type=StorePath(write=True),
              help="Label store to create, resume or append to: a local path, or s3://BUCKET/PREFIX.zarr.")
@click.option("--rounds", type=POSITIVE, default=4, show_default=True,
              help="Label rounds; training pass p (each image with its crops) replays round p mod R. More than "
                   "the store has appends.")
@crop_options
@click.option("--topk", type=POSITIVE, default=10, show_default=True, help="Classes kept per crop.")
@click.option("--temperature", type=POSITIVE_FLOAT, default=1.0, show_default=True,
              help="Softmax temperature applied to every teacher's logits.")
@click.option("--batch-size", type=POSITIVE, default=256, show_default=True, help="Crops per teacher forward.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the crop sampler.")
@click.option("--shard-size", type=POSITIVE, default=1024, show_default=True,
              help="Images per shard: the unit of writing, resuming and splitting across ranks (a shard's "
                   "largest chunk may take up to 1 GiB).")
@click.option("--skip-bad", is_flag=True, help="Leave out unreadable images (recorded in the store) instead of failing.")
@click.option("--dry-run", is_flag=True,
              help="Write nothing: time the teachers on a few batches of DATA's crops on --device and print what the "
                   "run will take (crops, hours, the store's bytes and objects, S3 requests).")
@loader_option
@device_option
@workers_option
@trust_option
def label(teachers, res, scale, ratio, **flags):
    """Label R rounds of random crops of DATA with the teacher ensemble into a resumable store.

    Before the first crop it prints each teacher's input (resolution, mean/std, class order)
    and, on labelled data, checks it against the labels (see --no-teacher-check)."""
    from ..common.models.teachers import split_specs
    from .config import LabelConfig
    from .labeler import run_label

    run_label(LabelConfig(**flags, teachers=split_specs(teachers), crop=crop_params(res, scale, ratio)))
