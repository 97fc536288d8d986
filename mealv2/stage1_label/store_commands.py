"""`mealv2 inspect` and `verify`: they import neither torch nor DALI unless `verify --data` re-runs teachers."""
from __future__ import annotations

import json

import click

from ..cli.params import NON_NEGATIVE, POSITIVE, LocalPath, StorePath, device_option, trust_option
from .report import run_lines, store_problems, store_summary, verify_store


@click.command()
@click.argument("store", type=StorePath(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(store, as_json):
    """Show what a label store holds: teachers, dataset, rounds, size, agreement with labels
    (on unlabelled data: the classes most often predicted top-1), the labelling runs and what each took."""
    summary = store_summary(store)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    checks = {c["teacher"]: c for c in summary.pop("teacher_check") or []}
    for key, value in summary.items():
        if key == "teachers":
            click.echo("teachers:")
            for t in value:
                check = checks.get(t["spec"], {})
                why = f" ({check['why']})" if check.get("why") else ""
                agreement = (f"teacher check skipped{why}" if check.get("skipped") else
                             f"top-1 agrees with the labels on {100 * check['agreement']:.1f}% of "
                             f"{check['crops']} sampled crops" if check else "not checked")
                click.echo(f"  {t['spec']}  ({t['arch']}, {t['res']} px, mean {t['mean']} std {t['std']}, weight "
                           f"{t['weight']}, sha256 {t['sha256'][:12]}): {agreement}")
        elif key == "runs":
            click.echo("labelling runs:")
            for line in run_lines(value):
                click.echo(f"  {line}")
        elif key == "top1_histogram":   # set only for unlabelled data, in place of the agreement
            if value is not None:
                shares = ", ".join(f"{name} {100 * share:.1f}%" for name, share in value.items())
                click.echo(f"top1_histogram (no labels; round 0's crops by predicted top-1 class, most "
                           f"predicted first): {shares}")
        elif not (key == "top1_agreement" and summary["top1_histogram"] is not None):
            click.echo(f"{key}: {value}")


@click.command()
@click.argument("store", type=StorePath(exists=True))
@click.option("--data", type=LocalPath(exists=True), help="Dataset the store was made from: re-run the teachers.")
@click.option("--recompute", type=POSITIVE, default=16, show_default=True, help="Stored crops to re-label with --data.")
@click.option("--tolerance", type=NON_NEGATIVE, default=0.02, show_default=True,
              help="Largest allowed |stored - recomputed| probability.")
@device_option
@trust_option
def verify(store, data, recompute, tolerance, device):
    """Check checksums and shard completion; with --data, re-run the teachers on stored crops."""
    problems, fix = store_problems(store)
    if not problems and data:
        problems = verify_store(store, data=data, recompute=recompute, tolerance=tolerance, device=device)
    if problems:
        for p in problems:
            click.echo(f"PROBLEM {p}", err=True)
        if fix:
            click.echo(fix, err=True)
        raise SystemExit(1)
    click.echo(f"{store}: OK")
