"""`mealv2 bench gpu`: the GPU smoke run, every GPU path a first real run takes, in minutes.

On a CUDA machine, in one run (each step is the real `mealv2` command, in a subprocess, as a user
runs it; a failing step stops the run with its output):

1. stage 1: the labeller against the bare teacher forward on the same crops (`bench label`'s
   measure: DALI ``mixed`` decode with nvJPEG, crops/s ratio, target >= 0.9), then
   `mealv2 label` of the generated train split;
2. stage 2: `mealv2 train --labels` on 1 GPU (bf16 autocast, channels_last, ``--compile``
   with inductor, ``--val`` every epoch), and its stored-label img/s against the same student's
   training step on synthetic tensors of the same batch (target >= 0.95);
3. with 2+ GPUs, the same training under torchrun (NCCL for the model, gloo for CPU metrics);
4. `mealv2 eval` and `mealv2 export --format onnx` of the trained student.

Without CUDA it says so and exits non-zero; CI does not run it. The teachers and the student
are random-init timm models (no downloads): speed and the paths, not accuracy. It also measures
`bench precision`'s KL figures on the GPU. On a CUDA machine without DALI, stage 1 is skipped
(said in the table), the store is written directly with synthetic labels, and stage 2 runs with
``--loader torch``.
"""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

from ..common.cli_options import POSITIVE
from ..common.dataset import build_index
from ..common.errors import MealV2Error
from ..common.models import create_timm_model
from ..common.runtime import Runtime
from ..stage2_train.losses import soft_cross_entropy
from .common import DEFAULT_TEACHERS, machine_description, make_photo_dataset, met, random_teachers
from .label import labeller_case
from . import precision
from .startup import make_case

PRECISION_NOTE = ("random-init timm teachers with a calibrated head (`bench precision`), one crop of each of the "
                  "first 64 val images")

STUDENT = "resnet50"


def mealv2_command(*args, torchrun: int = 0) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)] if torchrun else []
    return [sys.executable, *launcher, "-m", "mealv2.cli", *map(str, args)]


def run_step(name: str, command: list[str], log: list[dict]) -> str:
    """Run one command; its wall time goes to ``log``; a failure stops the smoke run naming the step."""
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    log.append({"step": name, "seconds": round(time.perf_counter() - started, 1), "command": " ".join(command)})
    if result.returncode != 0:
        raise MealV2Error(f"smoke step '{name}' failed (exit {result.returncode}):\n  {' '.join(command)}\n"
                          f"{result.stderr[-4000:]}")
    return result.stdout


def synthetic_img_per_s(arch: str, num_classes: int, res: int, batch: int, runtime: Runtime, compile: bool,
                        steps: int = 30) -> float:
    """The student's training step (bf16 autocast, channels_last on a GPU; SGD) on one synthetic batch:
    the ceiling the stored-label loader is compared with."""
    model = runtime.model(create_timm_model(arch, num_classes)).train()
    forward = torch.compile(model) if compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = runtime.input(torch.randn(batch, 3, res, res))
    target = torch.softmax(torch.randn(batch, num_classes, device=runtime.device), 1)

    def step():
        with runtime.autocast():
            loss = soft_cross_entropy(forward(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):   # warm-up (and compilation)
        step()
    runtime.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    runtime.synchronize()
    return steps * batch / (time.perf_counter() - started)


def last_img_per_s(run: Path) -> float:
    """The trainer's img/s of the run's last epoch (the first includes compilation)."""
    with open(run / "metrics.csv") as f:
        return float(list(csv.DictReader(f))[-1]["img_per_s"])


def has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def smoke_run(folder: Path, device: str, per_class: int, res: int, batch: int, epochs: int, compile: bool,
              gpus: int, workers: int, teachers=DEFAULT_TEACHERS, student: str = STUDENT,
              dali: bool = True) -> dict:
    """Every step of the smoke run in ``folder``; returns its figures (tests run it on the CPU, tiny).

    Without DALI (``dali`` False) stage 1 cannot run: the store is written directly with synthetic
    ImageNet-like labels (`bench startup`'s case: 1000 classes, rows over a few small JPEGs) and
    stage 2 uses the torch loader."""
    log: list[dict] = []
    common = ["--device", device, "--workers", workers]
    classes = 10
    if dali:
        data = make_photo_dataset(folder / "train", classes, per_class)
        val = make_photo_dataset(folder / "val", classes, max(2, per_class // 5), seed=1)
        specs = random_teachers(teachers, classes, folder, res)
        stage1 = labeller_case(data, specs, folder, res, 4, 5, min(classes * per_class, 512), batch, device,
                               workers, classes, repeats=1)
        store = folder / "labels.zarr"
        # random-init teachers agree with no labels: the teacher check would (rightly) stop them
        run_step("label", mealv2_command("label", data, "-t", ",".join(specs), "-o", store, "--res", res,
                                         "--rounds", 2, "--batch-size", batch, "--no-teacher-check", *common), log)
    else:
        stage1 = None
        data, store, _ = make_case(folder, 100 * per_class, 64, 2, 4, 5, 1024)
        val = folder / "val.csv"   # the rows of the first ten classes: scored among those, by name
        rows = data.read_text().splitlines()
        val.write_text("\n".join([rows[0]] + [r for r in rows[1:] if int(r.rsplit(",n", 1)[1]) < classes]) + "\n")
    loader = "dali" if dali else "torch"
    train = ["train", data, "--labels", store, "-a", student, "--epochs", epochs, "--batch-size", batch, "--res", res,
             "--val", val, "--loader", loader, *common, *(["--compile"] if compile else [])]
    run_step("train, 1 GPU" if device == "cuda" else "train", mealv2_command(*train, "-o", folder / "run1"), log)
    stored = last_img_per_s(folder / "run1")
    num_classes = len(build_index(data).classes)
    runtime = Runtime.create(device)
    synthetic = synthetic_img_per_s(student, num_classes, res, batch, runtime, compile)
    if not dali:
        specs = random_teachers(teachers, num_classes, folder, res)
    run_step("train online (teachers fp32 at every step)",
             mealv2_command("train", data, "--teachers", ",".join(specs), "--no-teacher-check", "-a", student,
                            "--epochs", 1, "--batch-size", batch, "--res", res, "--loader", loader, *common,
                            "-o", folder / "online"), log)
    if gpus >= 2:
        run_step(f"train, torchrun {gpus} GPUs (NCCL)", mealv2_command(*train, "-o", folder / "run2", torchrun=gpus), log)
    evaluated = json.loads(run_step("eval", mealv2_command("eval", val, "--checkpoint", folder / "run1" / "best.pt",
                                                           "--json", *common), log))
    run_step("export onnx", mealv2_command("export", folder / "run1" / "best.pt", "--format", "onnx"), log)
    precision_kl = (precision.measure(build_index(val), precision.ARCHS, res, 1, 5, device, loader, images=64)
                    if device == "cuda" else None)
    return {"device": str(runtime.device), "gpus": gpus, "loader": loader,
            "stage1_ratio": stage1["ratio"] if stage1 else None,
            "stage1_crops_per_s": stage1["labeller"][0] if stage1 else None,
            "stored_img_per_s": stored, "synthetic_img_per_s": synthetic, "stage2_ratio": stored / synthetic,
            "eval_top1": evaluated["top1"], "precision": precision_kl, "steps": log}


def report(r: dict, seconds: float) -> str:
    """The smoke run's tables (markdown, as BENCHMARKS.md keeps them)."""
    stage1 = (f"| stage-1 labeller / bare teacher forward (crops/s {r['stage1_crops_per_s']:.0f}) | "
              f"{r['stage1_ratio']:.2f} | >= 0.9 | {met(r['stage1_ratio'] >= 0.9)} |" if r["stage1_ratio"] is not None else
              "| stage-1 labeller / bare teacher forward | not run: DALI is not installed | >= 0.9 | |")
    lines = [f"`mealv2 bench gpu` on {machine_description(r['device'])}, {r['gpus']} GPU(s), "
             f"loader {r['loader']}; {seconds:.0f} s in all", "",
             "| measure | value | target | met |", "|---|---|---|---|", stage1,
             f"| stage-2 stored-label img/s / synthetic-tensor img/s ({r['stored_img_per_s']:.0f} / "
             f"{r['synthetic_img_per_s']:.0f}) | {r['stage2_ratio']:.2f} | >= 0.95 | {met(r['stage2_ratio'] >= 0.95)} |",
             "", "| step | seconds |", "|---|---|", *(f"| {s['step']} | {s['seconds']} |" for s in r["steps"]),
             "", f"Teacher precision on the GPU (KL per crop vs true fp32, max (mean)); {PRECISION_NOTE}:", "",
             *(precision.table(r["precision"], 5) if r["precision"] else [])]
    return "\n".join(lines)


@click.command("gpu")
@click.option("--per-class", type=POSITIVE, default=100, show_default=True,
              help="Generated train images per class (10 classes; without DALI: CSV rows / 100 over 1000 classes).")
@click.option("--res", type=POSITIVE, default=224, show_default=True)
@click.option("--batch-size", type=POSITIVE, default=256, show_default=True, help="Crops per step (and per teacher forward).")
@click.option("--epochs", type=POSITIVE, default=3, show_default=True)
@click.option("--workers", type=POSITIVE, default=8, show_default=True)
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the run's files in this folder (default: a temporary folder, removed).")
def bench_gpu(per_class, res, batch_size, epochs, workers, keep):
    """GPU smoke run: label (DALI mixed), train bf16 + compile (+ torchrun NCCL on 2+ GPUs), eval, export."""
    if not torch.cuda.is_available():
        raise MealV2Error("bench gpu is the GPU smoke run and torch sees no CUDA device here "
                          "(torch.cuda.is_available() is False); run it on a machine with a GPU")
    dali = has_dali()
    folder = keep or Path(tempfile.mkdtemp(prefix="mealv2-bench-gpu-"))
    started = time.perf_counter()
    try:
        r = smoke_run(folder, "cuda", per_class, res, batch_size, epochs, compile=True,
                      gpus=torch.cuda.device_count(), workers=workers, dali=dali)
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    click.echo(report(r, time.perf_counter() - started))
