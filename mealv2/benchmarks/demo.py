"""`mealv2 bench demo`: the demo's verdicts over several seeds, mean and spread.

Runs `mealv2 demo` (its default size) once per seed: dataset, label crops and students all
change with the seed; the shipped teachers stay. Prints each run's gaps and, per gap, the
mean, the sample standard deviation and the range: stored - hard-label top-1 (target >= +2
points), stored - online top-1 (target >= -1), stored / online training time (target <= 0.6),
student B's stored - hard, and the seed noise each run measured; then each run's verdict on the
top-1 targets, judged against that noise, which should not change with the seed. Not part of
CI: a default run takes about 4-5 minutes a seed on 2 CPU cores.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import click

from ..cli.params import POSITIVE
from ..demo import DEFAULTS, TARGETS, Settings, markdown_table, run_demo

GAPS = {"stored_minus_hard": ("A: stored - hard (top-1 points)", "+.2f", ">= +2"),
        "stored_minus_online": ("A: stored - online (top-1 points)", "+.2f", ">= -1"),
        "time_ratio_stored_online": ("A: train time stored / online", ".2f", "<= 0.6"),
        "cpu_ratio_stored_online": ("A: train process CPU stored / online", ".2f", "<= 0.6"),
        "B_stored_minus_hard": ("B: stored - hard (top-1 points)", "+.2f", "-"),
        "seed_noise_std": ("A: seed noise, std of one run (top-1 points)", ".2f", "-")}


def summary_table(runs: dict[int, dict]) -> str:
    """One row per gap: each seed's value, mean, sample std, min, max, target."""
    seeds = sorted(runs)
    rows = []
    for key, (name, spec, target) in GAPS.items():
        values = [runs[s]["gaps"][key] for s in seeds]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append([name, *(format(v, spec) for v in values), format(statistics.mean(values), spec),
                     f"{std:.2f}", format(min(values), spec), format(max(values), spec), target])
    walls = [runs[s]["total"]["wall_s"] for s in seeds]
    cpus = [runs[s]["total"]["cpu_s"] for s in seeds]
    rows.append(["demo wall time (s)", *(f"{v:.0f}" for v in walls), f"{statistics.mean(walls):.0f}",
                 f"{statistics.stdev(walls) if len(walls) > 1 else 0:.0f}", f"{min(walls):.0f}",
                 f"{max(walls):.0f}", "< 300"])
    rows.append(["demo process CPU (s)", *(f"{v:.0f}" for v in cpus), f"{statistics.mean(cpus):.0f}",
                 f"{statistics.stdev(cpus) if len(cpus) > 1 else 0:.0f}", f"{min(cpus):.0f}", f"{max(cpus):.0f}", "-"])
    for key in TARGETS:
        rows.append([f"verdict: {GAPS[key][0].split(' (')[0]}", *(runs[s]["verdicts"][key] for s in seeds),
                     "-", "-", "-", "-", GAPS[key][2]])
    return markdown_table(["gap", *(f"seed {s}" for s in seeds), "mean", "std", "min", "max", "target"], rows)


@click.command("demo")
@click.option("--seeds", type=POSITIVE, default=3, show_default=True, help="Runs, with seeds 0..N-1.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for the runs (OUT/seedS) [default: a temporary folder, removed].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=DEFAULTS.device, show_default=True)
def bench_demo(seeds, out, device):
    """`mealv2 demo` over several seeds: mean and spread of stored - hard, stored - online, time ratio."""
    with tempfile.TemporaryDirectory(prefix="mealv2-bench-demo-") as tmp:
        root = Path(out or tmp)
        runs = {s: run_demo(Settings(out=str(root / f"seed{s}"), seed=s, device=device)) for s in range(seeds)}
    click.secho(f"\nmealv2 bench demo --seeds {seeds}: {runs[0]['machine']}", bold=True)
    click.echo(summary_table(runs))
