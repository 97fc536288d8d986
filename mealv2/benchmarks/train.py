"""`mealv2 bench train`: student img/s from stored labels, hard labels and online teachers, in one run.

Same student, data, crops per step and loader in the three modes; each mode is a real
`mealv2 train` run (trainer.train) and its img/s is the trainer's own figure (training
samples, i.e. crops, per second from the end of each epoch's first step). Modes are run in
turn, ``--repeats`` times, and the median of each is kept, because a shared machine's
load drifts. Targets: stored >= 0.95 x hard; stored / online as close as possible to the
(teachers + student) / student cost, measured here on one pre-rendered batch.

Also: the RAM a label round takes in the loader for ImageNet (1,281,167 images), from the
bytes per image of the round read here (RoundData), since the loader holds one round.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from ..common.cli_options import POSITIVE, device_option
from ..common.crop_loader import View
from ..common.crops import CropParams
from ..common.dataset import build_index
from ..common.models import create_timm_model, default_data_config
from ..common.runtime import Runtime
from ..common.teachers import Ensemble, load_teacher, split_specs
from ..stage1_label.labeler import LabelConfig, run_label
from ..stage2_train.loader import FreshLabels, TrainLoader
from ..stage2_train.losses import soft_cross_entropy
from ..stage2_train.trainer import TrainConfig, train
from .common import DEFAULT_TEACHERS, machine_description, make_photo_dataset, random_teachers

IMAGENET_IMAGES = 1_281_167
MODES = ("stored", "hard", "online")


def mode_speed(mode: str, data: Path, store: Path, teachers: list[str], folder: Path, run: int,
               **common) -> tuple[float, float]:
    """(img/s, CPU ms per img) of one `mealv2 train` run: medians over its epochs after the first."""
    kw = {"stored": dict(labels=str(store)), "hard": dict(hard_labels=True),
          "online": dict(teachers=teachers, teacher_check=False)}   # random-init teachers: speed only
    rows = train(TrainConfig(data=str(data), out=str(folder / f"{mode}{run}"), progress=False, **kw[mode], **common))
    rows = rows[1:]
    return (statistics.median(r["img_per_s"] for r in rows),
            1000 * statistics.median(r["cpu_s_per_img"] for r in rows))


def cost_ratio(data: Path, arch: str, teachers: list[str], crop: CropParams, crops: int, batch_size: int,
               runtime: Runtime, workers: int, repeats: int = 3) -> dict:
    """Seconds per step on one pre-rendered batch, wall and process CPU: the student's training
    step and the teachers' forward; their (teachers + student) / student ratios."""
    index = build_index(data, workers=max(workers, 8))
    ensemble = Ensemble([load_teacher(s, index.classes, crop.res) for s in teachers], runtime)
    student = runtime.model(create_timm_model(arch, len(index.classes))).train()
    _, mean, std = default_data_config(student)
    views = [View(crop.res, mean, std)] + [v for v in ensemble.views if v != View(crop.res, mean, std)]
    labels = FreshLabels(0, index.sizes, crops, crop, index.labels)
    loader = TrainLoader(index, labels, views, max(1, batch_size // crops), 0, runtime.device, workers=workers)
    batch = next(iter(loader.epoch(0)))
    teacher_views = [batch.views[views.index(v)] for v in ensemble.views]
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    def student_step():
        loss = soft_cross_entropy(student(batch.images), batch.target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def timed(fn) -> tuple[float, float]:
        fn()  # warm-up
        walls, cpus = [], []
        for _ in range(repeats):
            runtime.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            runtime.synchronize()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        return statistics.median(walls), statistics.median(cpus)

    student, teachers = timed(student_step), timed(lambda: ensemble.probs(teacher_views))
    return {"student": student, "teachers": teachers,
            "ratio": [(t + s) / s for s, t in zip(student, teachers)]}


@click.command("train")
@click.argument("data", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--teachers", "-t", multiple=True,
              help=f"Teacher specs as for `mealv2 label`; default random-init {' + '.join(DEFAULT_TEACHERS)} at --res.")
@click.option("--arch", "-a", default="resnet18", show_default=True, help="Student (random init).")
@click.option("--res", type=POSITIVE, default=64, show_default=True, help="Crop resolution of student and teachers.")
@click.option("--crops-per-image", "crops", type=POSITIVE, default=4, show_default=True)
@click.option("--topk", type=POSITIVE, default=10, show_default=True)
@click.option("--images", type=POSITIVE, default=192, show_default=True, help="Images of the generated dataset.")
@click.option("--classes", type=POSITIVE, default=10, show_default=True, help="Classes of the generated dataset.")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True, help="Crops per step (global).")
@click.option("--epochs", type=click.IntRange(min=2), default=3, show_default=True,
              help="Epochs per run; the first is warm-up.")
@click.option("--repeats", type=POSITIVE, default=2, show_default=True, help="Runs of each mode, in turn.")
@click.option("--workers", type=POSITIVE, default=2, show_default=True, help="DALI threads.")
@device_option
def bench_train(data, teachers, arch, res, crops, topk, images, classes, batch_size, epochs, repeats, workers, device):
    """Student img/s with stored labels, hard labels and online teachers; RAM per label round."""
    folder = Path(tempfile.mkdtemp(prefix="mealv2-bench-train-"))
    try:
        if data is None:
            data = make_photo_dataset(folder / "data", classes, -(-images // classes))
        index = build_index(data, workers=max(workers, 8))
        specs = split_specs(teachers) or random_teachers(DEFAULT_TEACHERS, len(index.classes), folder, res)
        crop = CropParams(res=res)
        store = run_label(LabelConfig(data=str(data), teachers=specs, out=str(folder / "store"), rounds=1,
                                      crops_per_image=crops, crop=crop, topk=topk, batch_size=batch_size,
                                      device=device, workers=workers, teacher_check=False, progress=False))
        round_bytes = store.read_round(0).nbytes / store.num_images
        common = dict(arch=arch, crop=crop, crops_per_image=crops, batch_size=batch_size, epochs=epochs,
                      workers=workers, device=device)
        speed = {mode: [] for mode in MODES}
        for run in range(repeats):
            for mode in MODES:
                speed[mode].append(mode_speed(mode, data, store.path, specs, folder, run, **common))
        runtime = Runtime.create(device)
        dev = runtime.device
        cost = cost_ratio(data, arch, specs, crop, crops, batch_size, runtime, workers)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    wall = {mode: [v[0] for v in runs] for mode, runs in speed.items()}
    cpu = {mode: [v[1] for v in runs] for mode, runs in speed.items()}
    med = {mode: statistics.median(v) for mode, v in wall.items()}
    med_cpu = {mode: statistics.median(v) for mode, v in cpu.items()}
    fmt = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    # CPU-time ratios are inverted (cost per image) so that every ratio reads as a speed ratio
    vs_hard = med["stored"] / med["hard"], med_cpu["hard"] / med_cpu["stored"]
    vs_online = med["stored"] / med["online"], med_cpu["online"] / med_cpu["stored"]
    gib = round_bytes * IMAGENET_IMAGES / 2**30
    lines = [
        f"`mealv2 bench train` on {machine_description(dev.type)}; device {dev}",
        "",
        f"Student {arch} (random init) at {res} px on {len(index)} images ({len(index.classes)} classes, "
        f"{'generated ImageNet-sized JPEGs' if data == folder / 'data' else data}) x {crops} crops; {batch_size} "
        f"crops per step; {epochs} epochs per run (the first is warm-up), {repeats} run(s) per mode, in turn; "
        f"{workers} DALI threads; teachers {', '.join(s.split('=')[0] for s in specs)} at {res} px.",
        "",
        "| mode | img/s (runs) | CPU ms/img (runs) | speed ratio: wall, CPU | target |",
        "|---|---|---|---|---|",
        f"| hard labels (`--hard-labels`) | {fmt(wall['hard'])} | {fmt(cpu['hard'])} | 1.00 | |",
        f"| stored labels (`--labels`) | {fmt(wall['stored'])} | {fmt(cpu['stored'])} | stored / hard "
        f"**{vs_hard[0]:.2f}**, **{vs_hard[1]:.2f}** | >= 0.95: {met(vs_hard[0] >= 0.95)}, {met(vs_hard[1] >= 0.95)} |",
        f"| online teachers (`--teachers`) | {fmt(wall['online'])} | {fmt(cpu['online'])} | stored / online "
        f"**{vs_online[0]:.2f}**, **{vs_online[1]:.2f}** | (teachers + student) / student: "
        f"**{cost['ratio'][0]:.2f}**, **{cost['ratio'][1]:.2f}** |",
        "",
        f"img/s: crops per second, the trainer's figure, median over the timed epochs of a run; CPU ms/img: "
        f"process CPU time (torch and DALI threads) per crop over the same steps, which moves far less than "
        f"wall time when other processes share the CPU. Cost ratio on one pre-rendered batch of {batch_size} "
        f"crops: student step (forward, backward, SGD) {cost['student'][0] * 1000:.0f} ms wall / "
        f"{cost['student'][1] * 1000:.0f} ms CPU, teachers' forward {cost['teachers'][0] * 1000:.0f} ms / "
        f"{cost['teachers'][1] * 1000:.0f} ms.",
        "",
        "| label round in RAM (RoundData: boxes, flips, ids, probs) | per image | ImageNet, 1,281,167 images |",
        "|---|---|---|",
        f"| C={crops} crops, k={topk}, {len(index.classes)} classes (uint16 ids) | {round_bytes:.0f} B | "
        f"{gib:.2f} GiB ({round_bytes * IMAGENET_IMAGES / 1e6:.0f} MB) |",
        "",
        "The loader holds one round per process (the previous one is released before the next is read): "
        "that is its peak label RAM, per rank under DDP.",
    ]
    click.echo("\n".join(lines))
