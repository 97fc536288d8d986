"""`mealv2 label`, `inspect` and `verify`."""
from __future__ import annotations

import json

import click

from ..common.cli_options import POSITIVE, crop_options, crop_params, device_option, workers_option
from .report import store_summary, verify_store

# The labeller (torch, timm, DALI) is imported by `label` only: inspect and verify start quickly.


@click.command()
@click.argument("data", type=click.Path(exists=True))
@click.option("--teachers", "-t", multiple=True, required=True,
              help="ARCH | ARCH=CKPT | CKPT, optional @RES and *WEIGHT; repeatable or comma separated.")
@click.option("--out", "-o", required=True, type=click.Path(), help="Label store to create or resume.")
@click.option("--rounds", type=POSITIVE, default=4, show_default=True,
              help="Label rounds; training epoch e replays round e mod R. More than the store has appends.")
@crop_options
@click.option("--topk", type=POSITIVE, default=10, show_default=True, help="Classes kept per crop.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Softmax temperature applied to every teacher's logits.")
@click.option("--batch-size", type=POSITIVE, default=256, show_default=True, help="Crops per teacher forward.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the crop sampler.")
@click.option("--shard-size", type=POSITIVE, default=1024, show_default=True,
              help="Images per shard: the unit of writing, resuming and splitting across ranks.")
@click.option("--skip-bad", is_flag=True, help="Leave out unreadable images (recorded in the store) instead of failing.")
@device_option
@workers_option
def label(data, teachers, out, rounds, res, scale, ratio, crops_per_image, topk, temperature, batch_size,
          seed, shard_size, skip_bad, device, workers):
    """Label R rounds of random crops of DATA with the teacher ensemble into a resumable store."""
    from ..common.models import split_specs
    from .labeler import LabelConfig, run_label

    run_label(LabelConfig(data=data, teachers=split_specs(teachers), out=out, rounds=rounds,
                          crops_per_image=crops_per_image, crop=crop_params(res, scale, ratio), topk=topk,
                          temperature=temperature, batch_size=batch_size, seed=seed, device=device,
                          workers=workers, shard_size=shard_size, skip_bad=skip_bad))


@click.command()
@click.argument("store", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(store, as_json):
    """Show what a label store holds: teachers, dataset, rounds, size, agreement with labels."""
    summary = store_summary(store)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        if key == "teachers":
            click.echo("teachers:")
            for t in value:
                click.echo(f"  {t['spec']}  ({t['arch']}, {t['res']} px, weight {t['weight']}, "
                           f"sha256 {t['sha256'][:12]})")
        else:
            click.echo(f"{key}: {value}")


@click.command()
@click.argument("store", type=click.Path(exists=True))
@click.option("--data", type=click.Path(exists=True), help="Dataset the store was made from: re-run the teachers.")
@click.option("--recompute", type=POSITIVE, default=16, show_default=True, help="Stored crops to re-label with --data.")
@click.option("--tolerance", type=float, default=0.02, show_default=True,
              help="Largest allowed |stored - recomputed| probability.")
@device_option
def verify(store, data, recompute, tolerance, device):
    """Check checksums and shard completion; with --data, re-run the teachers on stored crops."""
    problems = verify_store(store, data=data, recompute=recompute, tolerance=tolerance, device=device)
    if problems:
        for p in problems:
            click.echo(f"PROBLEM {p}", err=True)
        raise SystemExit(1)
    click.echo(f"{store}: OK")
