"""`mealv2 demo`: the whole pipeline on a generated dataset, in minutes on a CPU.

1. generate a small ImageFolder dataset (mealv2/synthetic.py: shapes and textures in clutter)
2. train two or three small, different teachers with `mealv2 train --hard-labels`
3. label the train split with their ensemble: `mealv2 label`, `mealv2 inspect`
4. train a student from the store (`mealv2 train --labels`) and the same student with
   `--hard-labels` on the same budget (epochs, crops per step, lr, schedule)
5. evaluate every model with `mealv2 eval`; the ensemble with the same validate() on the
   mean of the teachers' softmax

Every stage is the click command a user runs, invoked in this process (no re-import of
torch per stage); the demo prints each one as a shell line, and every number in its table
and report comes from those runs' outputs (eval JSON, inspect JSON, metrics.csv).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from .common.cli_options import POSITIVE

DEFAULT_TEACHERS = "test_resnet,test_resnet"
DEFAULT_STUDENT = "test_resnet"
# Per-architecture optimiser settings that learn these tiny nets quickly (SGD for ResNets,
# AdamW for the rest); applied to teachers and student alike. Anything else: AdamW 4e-3.
RECIPES = {
    "test_resnet": ("sgd", 0.1),
    "resnet10t": ("sgd", 0.1),
    "resnet14t": ("sgd", 0.1),
}
DEFAULT_RECIPE = ("adamw", 0.004)
RUN_DIRS = ("teachers", "labels", "students")   # what the demo (re)creates under --out


@dataclass
class Step:
    """One command the demo ran."""

    stage: str
    args: list[str]
    seconds: float = 0.0
    output: str = ""

    @property
    def shell(self) -> str:
        return shlex.join(["mealv2", *self.args])


@dataclass
class Demo:
    out: Path
    steps: list[Step] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def run(self, stage: str, args: list, capture: bool = False) -> Step:
        """Run ``mealv2 ARGS`` in-process; print the shell line first; time it."""
        from .cli import cli

        step = Step(stage, [str(a) for a in args])
        click.secho(f"\n$ {step.shell}", fg="cyan", bold=True)
        buffer = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(buffer) if capture else contextlib.nullcontext():
            cli.main(step.args, prog_name="mealv2", standalone_mode=False)
        step.seconds = time.perf_counter() - started
        step.output = buffer.getvalue()
        self.steps.append(step)
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + step.seconds
        return step

    def timed(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds


def recipe(arch: str) -> tuple[str, float]:
    return RECIPES.get(arch, DEFAULT_RECIPE)


def _fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv rows with numbers as floats (empty cells as None)."""
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                for row in csv.DictReader(f)]


# ---------------------------------------------------------------------------------- ensemble
class SoftmaxMean:
    """Factory for an nn.Module: log of the mean of the teachers' softmax (weights equal).

    Its input is normalised with the first teacher's mean/std; a teacher with another
    normalisation gets the pixels re-normalised for it. All teachers must share a resolution.
    """

    @staticmethod
    def build(teachers):
        import torch
        from torch import nn

        class _Mean(nn.Module):
            def __init__(self):
                super().__init__()
                self.models = nn.ModuleList(t.model for t in teachers)
                m0, s0 = teachers[0].mean, teachers[0].std
                self.affine = [
                    (torch.tensor(s0).view(1, 3, 1, 1) / torch.tensor(t.std).view(1, 3, 1, 1),
                     (torch.tensor(m0) - torch.tensor(t.mean)).view(1, 3, 1, 1) / torch.tensor(t.std).view(1, 3, 1, 1))
                    for t in teachers]

            def forward(self, x):
                probs = 0
                for model, (a, b) in zip(self.models, self.affine):
                    probs = probs + torch.softmax(model(x * a.to(x) + b.to(x)).float(), dim=1)
                return torch.log(probs / len(self.models))

        return _Mean().eval()


def ensemble_top1(teacher_ckpts: list[Path], val: Path, res: int, batch_size: int, device: str,
                  workers: int) -> dict:
    """validate() of the averaged teacher softmax: the same loop as `mealv2 eval`."""
    import torch

    from .common.dataset import build_index
    from .common.runtime import Runtime
    from .common.teachers import load_teacher
    from .stage2_train.validate import validate

    index = build_index(val)
    teachers = [load_teacher(str(p), index.classes) for p in teacher_ckpts]
    if len({t.res for t in teachers}) != 1:
        raise click.UsageError("the demo's ensemble evaluation needs teachers of one resolution")
    runtime = Runtime.create(device)
    model = runtime.model(SoftmaxMean.build(teachers))
    with torch.no_grad():
        return validate(model, index, res, teachers[0].mean, teachers[0].std, runtime, batch_size, workers)


# ---------------------------------------------------------------------------------- report
def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(line, rows)])


def plot_students(stored: list[dict], hard: list[dict], path: Path, title: str) -> None:
    from matplotlib.figure import Figure   # object API: no pyplot, no global backend

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for rows, label in ((stored, "stored soft labels (mealv2 label -> train --labels)"),
                        (hard, "hard labels (train --hard-labels)")):
        pts = [(r["epoch"] + 1, r["val_top1"]) for r in rows if r["val_top1"] is not None]
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------- command
@click.command()
@click.option("--out", "-o", default="mealv2-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the dataset, runs, label store, report.md and curves.png.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the dataset, the crops and the training runs.")
@click.option("--images-per-class", type=POSITIVE, default=40, show_default=True, help="Train images per class.")
@click.option("--val-per-class", type=POSITIVE, default=30, show_default=True, help="Val images per class.")
@click.option("--classes", "num_classes", type=click.IntRange(2, 10), default=10, show_default=True,
              help="Number of classes (of the 10 shapes and textures).")
@click.option("--teachers", default=DEFAULT_TEACHERS, show_default=True,
              help="Comma-separated timm architectures of the teachers (trained here from scratch).")
@click.option("--student", default=DEFAULT_STUDENT, show_default=True, help="timm architecture of the student.")
@click.option("--teacher-epochs", type=POSITIVE, default=60, show_default=True)
@click.option("--epochs", type=POSITIVE, default=60, show_default=True,
              help="Epochs of each student (stored-label and hard-label alike).")
@click.option("--rounds", type=POSITIVE, default=None,
              help="Label rounds (default: --epochs, so the stored-label student never repeats a crop).")
@click.option("--crops-per-image", type=POSITIVE, default=2, show_default=True)
@click.option("--res", type=POSITIVE, default=48, show_default=True, help="Crop side for teachers and student.")
@click.option("--scale", default="0.25,1", show_default=True, help="Random-resized-crop area range.")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True, help="Crops per step.")
@click.option("--topk", type=POSITIVE, default=5, show_default=True, help="Classes stored per crop.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=POSITIVE, default=2, show_default=True, help="Decoding threads / loader workers.")
def demo(out, seed, images_per_class, val_per_class, num_classes, teachers, student, teacher_epochs, epochs,
         rounds, crops_per_image, res, scale, batch_size, topk, device, workers):
    """Label once, train a student: the whole pipeline on a generated dataset, on a CPU in minutes.

    Generates shapes-in-clutter JPEGs, trains small teachers, stores their ensemble's soft labels,
    trains a student from the store and the same student on hard labels, evaluates all of them and
    writes OUT/report.md and OUT/curves.png. Every stage is a `mealv2` command, printed as it runs."""
    from .synthetic import SyntheticConfig, generate

    started = time.perf_counter()
    out = Path(out)
    teacher_archs = [a.strip() for a in teachers.split(",") if a.strip()]
    if not teacher_archs:
        raise click.BadParameter("give at least one teacher architecture", param_hint="--teachers")
    rounds = rounds or epochs
    for sub in RUN_DIRS:   # a rerun starts its runs afresh; the dataset is reused when unchanged
        shutil.rmtree(out / sub, ignore_errors=True)
    for name in ("report.md", "curves.png", "results.json"):
        (out / name).unlink(missing_ok=True)
    demo = Demo(out)

    # 1. data
    t0 = time.perf_counter()
    cfg = SyntheticConfig(seed=seed, train_per_class=images_per_class, val_per_class=val_per_class,
                          num_classes=num_classes)
    paths = generate(out / "data", cfg)
    train_dir, val_dir = paths["train"], paths["val"]
    demo.timed("generate dataset", time.perf_counter() - t0)
    click.secho(f"dataset: {train_dir} ({images_per_class * num_classes} images), {val_dir} "
                f"({val_per_class * num_classes} images), {num_classes} classes: {', '.join(cfg.classes)}",
                bold=True)

    schedule = ["--batch-size", batch_size, "--cos", "--warmup-epochs", 1]
    runtime = ["--device", device, "--workers", workers]

    # 2. teachers
    teacher_ckpts = []
    for i, arch in enumerate(teacher_archs):
        opt, lr = recipe(arch)
        run = out / "teachers" / f"{i}_{arch}"
        demo.run("train teachers", ["train", train_dir, "--out", run, "-a", arch, "--hard-labels",
                                    "--epochs", teacher_epochs, "--lr", _fmt_lr(lr), "--opt", opt,
                                    "--res", res, "--scale", scale, "--crops-per-image", crops_per_image,
                                    *schedule, "--seed", seed + i, *runtime])
        teacher_ckpts.append(run / "last.pt")

    # 3. labels
    store = out / "labels" / "store.zarr"
    demo.run("label", ["label", train_dir, "-t", ",".join(map(str, teacher_ckpts)), "-o", store,
                       "--rounds", rounds, "--crops-per-image", crops_per_image, "--res", res,
                       "--scale", scale, "--topk", min(topk, num_classes), "--batch-size", 256,
                       "--seed", seed, "--device", device, "--workers", workers])
    inspect = json.loads(demo.run("label", ["inspect", store, "--json"], capture=True).output)

    # 4. students: same arch, epochs, batch, lr, schedule
    opt, lr = recipe(student)
    runs = {"stored": out / "students" / f"{student}_stored_labels",
            "hard": out / "students" / f"{student}_hard_labels"}
    student_args = ["-a", student, "--epochs", epochs, "--lr", _fmt_lr(lr), "--opt", opt,
                    "--val", val_dir, *schedule, "--seed", seed, *runtime]
    demo.run("train student (stored labels)", ["train", train_dir, "--out", runs["stored"], "--labels", store,
                                               *student_args])
    demo.run("train student (hard labels)", ["train", train_dir, "--out", runs["hard"], "--hard-labels",
                                             "--res", res, "--scale", scale, "--crops-per-image",
                                             crops_per_image, *student_args])

    # 5. evaluation: last.pt of every run (no model selection on the val split)
    def evaluate(ckpt: Path) -> dict:
        step = demo.run("evaluate", ["eval", val_dir, "--checkpoint", ckpt, "--res", res, "--batch-size",
                                     batch_size, "--device", device, "--workers", workers, "--json"],
                        capture=True)
        result = json.loads(step.output.strip().splitlines()[-1])
        click.echo(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%")
        return result

    teacher_results = [evaluate(c) for c in teacher_ckpts]
    t0 = time.perf_counter()
    ens = ensemble_top1(teacher_ckpts, val_dir, res, batch_size, device, workers)
    demo.timed("evaluate", time.perf_counter() - t0)
    click.echo(f"\nensemble of {len(teacher_ckpts)} teachers (mean softmax, validate()): "
               f"top-1 {ens['top1']:.2f}%  top-5 {ens['top5']:.2f}%")
    student_results = {mode: evaluate(run / "last.pt") for mode, run in runs.items()}
    metrics = {mode: read_metrics(run / "metrics.csv") for mode, run in runs.items()}
    total = time.perf_counter() - started

    # table, curves, report
    train_steps = [s for s in demo.steps if s.args[0] == "train"]
    rows = []
    for i, (arch, r) in enumerate(zip(teacher_archs, teacher_results)):
        rows.append([f"teacher {i + 1}", arch, f"hard labels, {teacher_epochs} ep", f"{r['top1']:.2f}",
                     f"{r['top5']:.2f}", f"{train_steps[i].seconds:.1f}"])
    rows.append(["ensemble", " + ".join(teacher_archs), "mean of teacher softmax", f"{ens['top1']:.2f}",
                 f"{ens['top5']:.2f}", "-"])
    for mode, what, step in (("stored", f"stored labels, {epochs} ep", train_steps[-2]),
                             ("hard", f"hard labels, {epochs} ep", train_steps[-1])):
        r = student_results[mode]
        rows.append([f"student ({mode})", student, what, f"{r['top1']:.2f}", f"{r['top5']:.2f}",
                     f"{step.seconds:.1f}"])
    results = _table(["model", "arch", "trained on", "val top-1 (%)", "val top-5 (%)", "train time (s)"], rows)
    stage_rows = [[stage, f"{sec:.1f}"] for stage, sec in demo.stage_seconds.items()]
    stage_rows.append(["total", f"{total:.1f}"])
    stages = _table(["stage", "time (s)"], stage_rows)
    store_line = (f"label store: {inspect['bytes_on_disk'] / 1024:.1f} KiB on disk, "
                  f"{inspect['bytes_per_crop']} bytes per crop, {inspect['crops']} crops "
                  f"({inspect['rounds_complete']} rounds x {inspect['num_images']} images x "
                  f"{inspect['crops_per_image']} crops), top-{inspect['topk']}; ensemble top-1 agrees with "
                  f"the image label on {100 * inspect['top1_agreement']:.1f}% of round-0 crops")
    gain = student_results["stored"]["top1"] - student_results["hard"]["top1"]
    verdict = (f"stored-label student - hard-label student: {gain:+.2f} top-1 points "
               f"({'stored labels ahead' if gain > 0 else 'no gain from stored labels in this run' if gain == 0 else 'hard labels ahead in this run'})")
    plot_students(metrics["stored"], metrics["hard"], out / "curves.png",
                  f"{student}, {epochs} epochs, {batch_size} crops/step")

    click.secho("\nResults (val split, MEAL V2 test protocol: resize res/0.875, center crop res)", bold=True)
    click.echo(results)
    click.echo("")
    click.echo(stages)
    click.echo(store_line)
    click.secho(verdict, bold=True)
    click.secho("\nCommands run (repeat them on your own ImageFolder data):", bold=True)
    for step in demo.steps:
        click.echo(step.shell)
    _write_report(out, locals())
    click.echo(f"\nwrote {out / 'report.md'} and {out / 'curves.png'}")


def _write_report(out: Path, v: dict) -> None:
    import torch

    settings = {
        "seed": v["seed"], "classes": v["num_classes"], "train images per class": v["images_per_class"],
        "val images per class": v["val_per_class"], "teachers": v["teachers"], "student": v["student"],
        "teacher epochs": v["teacher_epochs"], "student epochs": v["epochs"], "label rounds": v["rounds"],
        "crops per image": v["crops_per_image"], "resolution": v["res"], "crop scale": v["scale"],
        "crops per step": v["batch_size"], "top-k stored": min(v["topk"], v["num_classes"]),
        "device": v["device"], "workers": v["workers"],
    }
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores visible, torch {torch.__version__} "
               f"({torch.get_num_threads()} threads), Python {platform.python_version()}")
    commands = "\n".join(s.shell for s in v["demo"].steps)
    text = f"""# mealv2 demo report

Generated by `{shlex.join(['mealv2', 'demo', *sys.argv[2:]]) if sys.argv[1:2] == ['demo'] else 'mealv2 demo'}`.
Dataset: {v['num_classes']} classes of procedural shapes and textures in clutter (mealv2/synthetic.py),
JPEGs of varied size, colour independent of the class; train `{v['train_dir']}`, val `{v['val_dir']}`.

## Results

Top-1/top-5 on the val split with MEAL V2's test protocol (`mealv2 eval`: resize to res/0.875,
center crop res). Every model is evaluated at its last epoch (`last.pt`): the val split picks
nothing. The ensemble row is validate() on the mean of the teachers' softmax.

{v['results']}

{v['verdict']}

## Time per stage

{v['stages']}

Machine: {machine}.

## Label store

{v['store_line']}.

## Settings

{_table(['setting', 'value'], [[k, str(x)] for k, x in settings.items()])}

## Commands

```sh
{commands}
```

![student val top-1 per epoch](curves.png)
"""
    (out / "report.md").write_text(text)
    results = {
        "teachers": [{"arch": a, **r} for a, r in zip(v["teacher_archs"], v["teacher_results"])],
        "ensemble": v["ens"], "students": v["student_results"], "stage_seconds": v["demo"].stage_seconds,
        "total_seconds": v["total"], "store": v["inspect"], "settings": settings,
        "commands": [s.shell for s in v["demo"].steps],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
