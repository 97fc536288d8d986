"""`mealv2 label`: its flags are LabelConfig's fields, with the types, ranges and defaults declared there."""
from __future__ import annotations

from functools import partial

import click

from ..cli.options import config_argument, config_option, config_options, crop_options, teacher_options
from ..cli.params import device_option, loader_option, trust_option, workers_option
from .config import LabelConfig

option = partial(config_option, LabelConfig)   # the flag of a LabelConfig field
LABELS = {  # field: its flag's help, in --help's order
    "topk": "Classes kept per crop.",
    "temperature": "Softmax temperature applied to every teacher's logits.",
    "batch_size": "Crops per teacher forward.",
    "seed": "Seed of the crop sampler.",
    "shard_size": "Images per shard: the unit of writing, resuming and splitting across ranks (a shard's largest "
                  "chunk may take up to 1 GiB).",
    "skip_bad": "Leave out unreadable images (recorded in the store) instead of failing.",
    "keep_teachers": "Also store each teacher's own top-k over the same crops (per-teacher layers, same encoding), "
                     "so `train --teacher-weights` can reweigh the teachers without running them again.",
    "dry_run": "Write nothing: time the teachers on a few batches of DATA's crops on --device and print what the "
               "run will take (crops, hours, the store's bytes and objects, S3 requests).",
}
EXECUTION = {
    "write_depth": "Shards in flight on the background writer; 0 writes in the loop.",
    "progress": "Progress bars on stderr.",
}
# The labeller (torch, timm, DALI) is imported when `label` runs.


def _once(param, specs: tuple[str, ...]) -> str | None:
    """--add-teacher's one spec: given twice, click would keep the last one silently."""
    if len(specs) > 1:
        raise click.BadParameter(f"given {len(specs)} times ({', '.join(specs)}); a run adds one teacher's layer: run "
                                 f"`mealv2 label --add-teacher SPEC` once per teacher", param=param)
    return specs[0] if specs else None


@click.command()
@config_argument(LabelConfig, "data", exists=True)
@teacher_options(LabelConfig)
@option("out", "-o", required=True,
        help="Label store to create, resume or append to: a local path, or s3://BUCKET/PREFIX.zarr.")
@option("rounds", help="Label rounds; training pass p (each image with its crops) replays round p mod R. More than "
                       "the store has appends.")
@crop_options(LabelConfig)
@config_options(LabelConfig, LABELS)
@option("add_teacher", multiple=True, callback=lambda ctx, param, specs: _once(param, specs),
        help="Instead of --teachers: run only this teacher (a spec as --teachers') over the finished store --out's "
             "own crops, teacher-checked, and add its per-teacher layer; the store's labels, digest and runs trained "
             "from it stay as they were (docs/STORE.md). The layer takes the store's --rounds, crops, --topk, "
             "--temperature, --seed and --shard-size: leave them out or give the store's (another value is refused). "
             "One teacher a run. Re-run to resume.")
@loader_option
@device_option
@workers_option
@config_options(LabelConfig, EXECUTION)
@trust_option
def label(**flags):
    """Label R rounds of random crops of DATA with the teacher ensemble into a resumable store.

    Before the first crop it prints each teacher's input (resolution, mean/std, class order)
    and, on labelled data, checks it against the labels (see --no-teacher-check)."""
    from .labeler import run_label

    run_label(LabelConfig(**flags))
