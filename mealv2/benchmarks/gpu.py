"""`mealv2 bench gpu`: the GPU run, every measure of issue 17 and every GPU path, in one command.

On a CUDA machine, in one run (the training steps are the real `mealv2` command, in a subprocess,
as a user runs it; ResNet-50 student at 224 px, bf16 autocast, channels_last, ``--compile``):

1. stage 1: the labeller against the bare teacher forward on the same crops (`bench label`'s
   measure: one resnet50 teacher in bf16, the fastest forward and so the hardest case for the
   labeller's decode and writes; target >= 0.9), then `mealv2 label` of the generated images;
2. stage 2, for every loader backend `mealv2 train --loader` offers: `mealv2 train --labels`
   (``--val`` every epoch) and its stored-label img/s against the same student's training step
   on synthetic tensors of the same batch (target >= 0.95), on ImageNet-sized JPEGs;
3. stored against online distillation with two MEAL V2-sized random-init teachers (resnet152 and
   senet154, bf16): stored img/s / online img/s against its ideal, (teacher forward + student
   step) / student step, each timed bare on synthetic tensors (target >= 0.9 x the ideal);
4. with 2+ GPUs, the stored training under torchrun (NCCL for the model, gloo for CPU metrics);
5. `mealv2 eval` and `mealv2 export --format onnx` of the fastest backend's student, and
   `bench precision`'s KL figures on the GPU.

A failing step is recorded with its error and the run goes on (a GPU session is short: one broken
backend must not cost the other figures); the command then exits non-zero. Without CUDA it says so
and exits non-zero; CI runs the same steps on the CPU, tiny (tests/test_gpu_smoke.py). Nothing is
downloaded and DALI is optional: the images are generated, the teachers and students are
random-init timm models (speed, not accuracy), and the stage-2 store is written directly with
synthetic ImageNet-like labels (`bench startup`'s case over ImageNet-sized JPEGs), so stage 2
runs whatever stage 1 could do on the machine.
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

from ..cli.params import POSITIVE
from ..common.data.dataset import build_index
from ..common.errors import MealV2Error
from ..common.data.loaders.registry import LOADERS, installed, resolve
from ..common.models.checkpoints import create_timm_model
from ..common.models.runtime import Runtime, machine_description
from ..common.models.teachers import Ensemble, load_teacher
from ..stage2_train.losses import soft_cross_entropy
from .common import make_photo_dataset, met, random_teachers
from .label import labeller_case
from . import precision
from .startup import make_case

PRECISION_NOTE = ("random-init timm teachers with a calibrated head (`bench precision`), one crop of each of the "
                  "first 64 val images")

STUDENT = "resnet50"
STAGE1_TEACHERS = ("resnet50",)
ONLINE_TEACHERS = ("resnet152", "senet154")
PRECISION = "bf16"      # the teachers' here (--teacher-precision); students train in bf16 autocast on a GPU
CROPS, TOPK, CLASSES = 4, 5, 1000   # stage 2's store: MEAL V2's 4 crops per image, ImageNet's classes


def loader_backends() -> list[str]:
    """The installed loader backends of the registry: a backend added there is measured here."""
    return [name for name in LOADERS if installed(name)]


def mealv2_command(*args, torchrun: int = 0) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)] if torchrun else []
    return [sys.executable, *launcher, "-m", "mealv2.cli", *map(str, args)]


def _last_lines(text: str, n: int = 3) -> str:
    return " / ".join([line.strip() for line in text.splitlines() if line.strip()][-n:])


def run_step(name: str, command: list[str], log: list[dict]) -> str | None:
    """Run one command; its wall time and outcome go to ``log``; its stdout, or None when it failed."""
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    entry = {"step": name, "seconds": round(time.perf_counter() - started, 1), "command": " ".join(command),
             "ok": result.returncode == 0}
    if result.returncode != 0:
        entry["error"] = f"exit {result.returncode}: {_last_lines(result.stderr)}"
    _record(log, entry)
    return result.stdout if result.returncode == 0 else None


def _record(log: list[dict], entry: dict) -> None:
    """Log a step, and say it on stderr at once: a run stopped by a time limit still shows how far it got."""
    log.append(entry)
    click.echo(f"bench gpu: {entry['step']}: {entry['seconds']} s, {'ok' if entry['ok'] else entry['error']}", err=True)


def measure_step(name: str, log: list[dict], measure, *args, **kwargs):
    """Run an in-process measure like :func:`run_step` runs a command: a failure is recorded, not raised."""
    started = time.perf_counter()
    try:
        value = measure(*args, **kwargs)
    except Exception as e:   # noqa: BLE001 -- recorded in the table and the JSON, and the exit status
        _record(log, {"step": name, "seconds": round(time.perf_counter() - started, 1), "ok": False,
                      "error": f"{type(e).__name__}: {_last_lines(str(e))}"})
        return None
    _record(log, {"step": name, "seconds": round(time.perf_counter() - started, 1), "ok": True})
    return value


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

    return _rate(step, batch, runtime, steps)


def teacher_img_per_s(specs: list[str], classes, res: int, batch: int, runtime: Runtime, steps: int = 20) -> float:
    """The teachers' ensemble forward (as online training runs it) on one synthetic batch: with the
    student's step, the cost of an online step when the loader keeps up."""
    ensemble = Ensemble([load_teacher(spec, classes, res) for spec in specs], runtime)
    views = [torch.randn(batch, 3, v.res, v.res, device=runtime.device) for v in ensemble.views]
    return _rate(lambda: ensemble.probs(views), batch, runtime, steps)


def _rate(step, batch: int, runtime: Runtime, steps: int) -> float:
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


def smoke_run(folder: Path, device: str, *, images: int, rows: int, files: int, res: int, batch: int, epochs: int,
              compile: bool, gpus: int, workers: int, stage1_teachers=STAGE1_TEACHERS,
              online_teachers=ONLINE_TEACHERS, student: str = STUDENT, shard_size: int = 256) -> dict:
    """Every step of the run in ``folder``; returns its figures (tests run it on the CPU, tiny).

    Stage 1 labels ``images`` generated ImageNet-sized JPEGs (10 classes) in shards of
    ``shard_size`` images, so that writes happen during a pass; stage 2 trains on ``rows`` CSV rows
    over ``files`` such JPEGs (1000 classes) with a store written directly."""
    log: list[dict] = []
    common = ["--device", device, "--workers", workers]
    runtime = Runtime.create(device)
    compiled = ["--compile"] if compile else []

    # 1. stage 1
    data = make_photo_dataset(folder / "train", 10, -(-images // 10))
    (folder / "stage1_teachers").mkdir()
    specs = random_teachers(stage1_teachers, 10, folder / "stage1_teachers", res)
    stage1 = measure_step("stage 1: labeller and bare teacher forward", log, labeller_case, data, specs, folder, res,
                          CROPS, TOPK, images, batch, device, workers, 10, repeats=1, shard_size=shard_size,
                          teacher_precision=PRECISION)
    run_step("label", mealv2_command("label", data, "-t", ",".join(specs), "-o", folder / "labels.zarr", "--res", res,
                                     "--rounds", 1, "--batch-size", batch, "--teacher-precision", PRECISION,
                                     "--no-teacher-check", *common), log)

    # 2. stage 2, each loader backend
    case, store, index = make_case(folder / "stage2", rows, files, 2, CROPS, TOPK, 1024, threads=workers, photos=True)
    val = case.with_name("val.csv")   # the rows of the first ten classes: scored among those, by name
    lines = case.read_text().splitlines()
    val.write_text("\n".join([lines[0]] + [r for r in lines[1:] if int(r.rsplit(",n", 1)[1]) < 10]) + "\n")
    synthetic = measure_step("student step on synthetic tensors", log, synthetic_img_per_s, student, len(index.classes),
                             res, batch, runtime, compile)
    train = ["train", case, "--labels", store, "-a", student, "--epochs", epochs, "--batch-size", batch, "--res", res,
             *common, *compiled]
    stored = {}
    for backend in loader_backends():
        run = folder / f"run-{backend}"
        if run_step(f"train --loader {backend}", mealv2_command(*train, "--val", val, "--loader", backend, "-o", run),
                    log) is not None:
            stored[backend] = last_img_per_s(run)
    best = max(stored, key=stored.get, default=None)

    # 3. stored against online, MEAL V2-sized teachers
    online, ideal = None, None
    if best is not None:
        big = random_teachers(online_teachers, len(index.classes), folder, res)
        teachers_rate = measure_step("teachers' forward on synthetic tensors", log, teacher_img_per_s, big,
                                     index.classes, res, batch, Runtime(runtime.device, PRECISION))
        if run_step(f"train online --loader {best}",
                    mealv2_command("train", case, "--teachers", ",".join(big), "--teacher-precision", PRECISION,
                                   "--no-teacher-check", "-a", student, "--epochs", epochs, "--batch-size", batch,
                                   "--res", res, "--loader", best, *common, *compiled, "-o", folder / "online"),
                    log) is not None:
            online = last_img_per_s(folder / "online")
        if teachers_rate and synthetic:
            ideal = 1 + synthetic / teachers_rate

    # 4., 5. the other GPU paths
    if gpus >= 2 and best is not None:
        run_step(f"train --loader {best}, torchrun {gpus} GPUs (NCCL)",
                 mealv2_command(*train, "--loader", best, "-o", folder / "run-torchrun", torchrun=gpus), log)
    evaluated = None
    if best is not None:
        out = run_step("eval", mealv2_command("eval", val, "--checkpoint", folder / f"run-{best}" / "best.pt", "--json",
                                              *common), log)
        evaluated = json.loads(out)["top1"] if out is not None else None
        run_step("export onnx", mealv2_command("export", folder / f"run-{best}" / "best.pt", "--format", "onnx"), log)
    precision_kl = (measure_step("teacher precision", log, precision.measure, build_index(val), precision.ARCHS, res,
                                 1, TOPK, device, resolve("auto"), images=64)
                    if device == "cuda" else None)
    return {"device": str(runtime.device), "gpus": gpus, "student": student, "res": res, "batch": batch,
            "student_precision": runtime.resolved_precision, "memory_format": str(runtime.memory_format),
            "stage1": stage1, "stage1_teachers": list(stage1_teachers), "shard_size": shard_size,
            "synthetic_img_per_s": synthetic, "stored_img_per_s": stored, "best_loader": best,
            "stage2_ratio": {b: v / synthetic for b, v in stored.items()} if synthetic else {},
            "online_teachers": list(online_teachers), "online_img_per_s": online, "ideal": ideal,
            "stored_over_online": stored[best] / online if online else None,
            "eval_top1": evaluated, "precision": precision_kl, "steps": log,
            "failed": [s["step"] for s in log if not s["ok"]]}


def _cell(value: float | None, fmt: str = ".2f") -> str:
    return "not measured" if value is None else format(value, fmt)


def report(r: dict, seconds: float) -> str:
    """The run's tables (markdown, as BENCHMARKS.md keeps them)."""
    s1 = r["stage1"]
    stage1 = (f"| stage-1 labeller / bare teacher forward ({', '.join(r['stage1_teachers'])} {PRECISION}; labeller "
              f"{s1['labeller'][0]:.0f} crops/s, shards of {r['shard_size']} images; writing in its loop instead: "
              f"{s1['inline_ratio']:.2f}) | {s1['ratio']:.2f} | >= 0.9 | {met(s1['ratio'] >= 0.9)} |" if s1 else
              "| stage-1 labeller / bare teacher forward | not measured: failed (steps below) | >= 0.9 | |")
    lines = [f"`mealv2 bench gpu` on {machine_description(r['device'])}, {r['gpus']} GPU(s); student {r['student']} at "
             f"{r['res']} px, batch {r['batch']}, {r['student_precision']}, {r['memory_format'].split('.')[-1]}; "
             f"{seconds:.0f} s in all", "",
             "| measure | value | target | met |", "|---|---|---|---|", stage1]
    for backend in loader_backends():
        if backend in r["stored_img_per_s"] and r["synthetic_img_per_s"]:
            ratio = r["stage2_ratio"][backend]
            lines.append(f"| stage-2 stored-label img/s / synthetic-tensor img/s, `--loader {backend}` "
                         f"({r['stored_img_per_s'][backend]:.0f} / {r['synthetic_img_per_s']:.0f}) | {ratio:.2f} | "
                         f">= 0.95 | {met(ratio >= 0.95)} |")
        else:
            lines.append(f"| stage-2 stored-label img/s / synthetic-tensor img/s, `--loader {backend}` | "
                         f"not measured: failed (steps below) | >= 0.95 | |")
    if r["stored_over_online"] is not None and r["ideal"] is not None:
        x, ideal = r["stored_over_online"], r["ideal"]
        lines.append(f"| stored / online img/s, teachers {' + '.join(r['online_teachers'])} {PRECISION}, `--loader "
                     f"{r['best_loader']}` ({r['stored_img_per_s'][r['best_loader']]:.0f} / "
                     f"{r['online_img_per_s']:.0f}) "
                     f"| {x:.2f}, ideal (teachers + student) / student {ideal:.2f}: {x / ideal:.2f} of it | "
                     f">= 0.9 of the ideal | {met(x >= 0.9 * ideal)} |")
    else:
        lines.append("| stored / online img/s against (teachers + student) / student | not measured: failed "
                     "(steps below) | >= 0.9 of the ideal | |")
    lines += ["", "| step | seconds | outcome |", "|---|---|---|",
              *(f"| {s['step']} | {s['seconds']} | {'ok' if s['ok'] else 'failed: ' + s['error']} |"
                for s in r["steps"])]
    if r["precision"]:
        lines += ["", f"Teacher precision on the GPU (KL per crop vs true fp32, max (mean)); {PRECISION_NOTE}:", "",
                  *precision.table(r["precision"], TOPK)]
    return "\n".join(lines)


@click.command("gpu")
@click.option("--images", type=POSITIVE, default=1024, show_default=True,
              help="Generated ImageNet-sized JPEGs stage 1 labels (10 classes).")
@click.option("--rows", type=POSITIVE, default=10000, show_default=True,
              help="Stage 2's CSV rows (1000 classes), an epoch's crops, over --files generated JPEGs.")
@click.option("--files", type=POSITIVE, default=256, show_default=True,
              help="Distinct ImageNet-sized JPEGs of stage 2.")
@click.option("--res", type=POSITIVE, default=224, show_default=True)
@click.option("--batch-size", type=POSITIVE, default=256, show_default=True, help="Crops per step (and per teacher forward).")
@click.option("--epochs", type=POSITIVE, default=2, show_default=True,
              help="Epochs of each training run; img/s is the last one's (the first compiles).")
@click.option("--workers", type=POSITIVE, default=8, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench_gpu.json"),
              show_default=True, help="Where the figures and every step's outcome are written.")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the run's files in this folder (default: a temporary folder, removed).")
def bench_gpu(images, rows, files, res, batch_size, epochs, workers, json_path, keep):
    """GPU run: labeller vs bare forward, each loader vs synthetic, stored vs online vs ideal, eval, export."""
    if not torch.cuda.is_available():
        raise MealV2Error("bench gpu is the GPU smoke run and torch sees no CUDA device here "
                          "(torch.cuda.is_available() is False); run it on a machine with a GPU")
    folder = keep or Path(tempfile.mkdtemp(prefix="mealv2-bench-gpu-"))
    started = time.perf_counter()
    try:
        r = smoke_run(folder, "cuda", images=images, rows=rows, files=files, res=res, batch=batch_size, epochs=epochs,
                      compile=True, gpus=torch.cuda.device_count(), workers=workers)
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    seconds = time.perf_counter() - started
    json_path.write_text(json.dumps({**r, "seconds": seconds, "machine": machine_description(r["device"])}, indent=1,
                                    default=str))
    click.echo(report(r, seconds))
    if r["failed"]:
        raise MealV2Error(f"bench gpu: {len(r['failed'])} step(s) failed: {', '.join(r['failed'])} "
                          f"(errors in the table above and in {json_path})")
