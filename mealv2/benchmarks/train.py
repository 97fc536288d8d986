"""`mealv2 bench train`: student img/s from stored labels, hard labels and online teachers, in one run.

Same student, data, crops per step and loader in the three modes; each mode is a real
`mealv2 train` run (trainer.train) and its img/s is the trainer's own figure (training
samples, i.e. crops, per second from the end of each epoch's first step). Modes are run in
turn, ``--repeats`` times, and the median of each is kept, because a shared machine's
load drifts. Targets: stored >= 0.95 x hard; stored / online as close as possible to the
(teachers + student) / student cost, measured here on one pre-rendered batch.

Also: the RAM a label round takes in the loader for ImageNet (1,281,167 images), from the
bytes per image of the round read here (RoundData), since the loader holds one round; and, for
one store made at --res, stored-label img/s of students at other resolutions (``--student-res``)
and the wall time of a progressive-resizing run against the fixed-res stored run, in the same turns.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import click
import crc32c
import torch

from ..cli.params import POSITIVE, LocalPath, device_option
from ..common.data.crops import CropParams
from ..common.data.dataset import build_index
from ..common.data.loaders.base import View
from ..common.models.checkpoints import create_timm_model, default_data_config
from ..common.models.runtime import Runtime, machine_description
from ..common.models.teachers import Ensemble, load_teacher, split_specs
from ..stage1_label.config import LabelConfig
from ..stage1_label.labeler import run_label
from ..stage2_train.config import TrainConfig
from ..stage2_train.loader import FreshLabels, TrainLoader
from ..stage2_train.losses import soft_cross_entropy
from ..stage2_train.res_schedule import ResSchedule, res_schedule
from ..stage2_train.trainer import train
from .common import DEFAULT_TEACHERS, make_photo_dataset, met, random_teachers

IMAGENET_IMAGES = 1_281_167
MODES = ("stored", "hard", "online")


def mode_speed(mode: str, data: Path, store: Path, teachers: list[str], out: Path,
               **common) -> tuple[float, float, float]:
    """(img/s, CPU ms per img, wall s) of one `mealv2 train` run: img/s and CPU ms are medians over
    its epochs after the first; wall s is the whole run's (start-up and every epoch)."""
    kw = {"stored": dict(labels=str(store)), "hard": dict(hard_labels=True),
          "online": dict(teachers=teachers, teacher_check=False)}   # random-init teachers: speed only
    started = time.perf_counter()
    rows = train(TrainConfig(data=str(data), out=str(out), progress=False, **kw[mode], **common))
    wall = time.perf_counter() - started
    rows = rows[1:]
    return (statistics.median(r["img_per_s"] for r in rows),
            1000 * statistics.median(r["cpu_s_per_img"] for r in rows), wall)


def student_res(res: int) -> tuple[int, ...]:
    """Default student resolutions served by a store made at ``res``: 1/2, 3/4 and 1 of it (multiples of 8)."""
    return tuple(sorted({max(8, res * f // 4 // 8 * 8) for f in (2, 3)} | {res}))


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


def crc_seconds_per_image(index, repeats: int = 20) -> float:
    """CPU seconds per image of the changed-image check (CRC32C of the file's bytes, which the loader
    reads anyway), over the bench's own files."""
    blobs = [index.path(i).read_bytes() for i in range(len(index))]
    started = time.process_time()
    for _ in range(repeats):
        for blob in blobs:
            crc32c.crc32c(blob)
    return (time.process_time() - started) / (repeats * len(blobs))


@click.command("train")
@click.argument("data", required=False, type=LocalPath(exists=True, path_type=Path))
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
@click.option("--student-res", "students", type=POSITIVE, multiple=True,
              help="Stored-label student resolutions (repeatable); default 1/2, 3/4 and 1 of --res. The "
                   "progressive run ramps from the smallest to --res.")
@device_option
def bench_train(data, teachers, arch, res, crops, topk, images, classes, batch_size, epochs, repeats, workers,
                students, device):
    """Student img/s with stored labels, hard labels and online teachers; stored-label img/s at
    several student resolutions; a progressive-resizing run against a fixed-res one; RAM per label round."""
    students = tuple(sorted(set(students))) or student_res(res)
    # Progressive: from the smallest student res (epoch 0) up to --res at the last epoch, in multiples of 8.
    ramp = res_schedule(res, epochs, min(*students, res), 0, epochs - 1, 8)
    folder = Path(tempfile.mkdtemp(prefix="mealv2-bench-train-"))
    try:
        if data is None:
            data = make_photo_dataset(folder / "data", classes, -(-images // classes))
        index = build_index(data, workers=max(workers, 8))
        specs = split_specs(teachers) or random_teachers(DEFAULT_TEACHERS, len(index.classes), folder, res)
        crop = CropParams(res=res)
        store = run_label(LabelConfig(data=str(data), teachers=specs, out=str(folder / "store"), rounds=1,
                                      crops_per_image=crops, res=res, topk=topk, batch_size=batch_size,
                                      device=device, workers=workers, teacher_check=False, progress=False))
        round_bytes = store.read_round(0).nbytes / store.num_images
        common = dict(arch=arch, res=res, crops_per_image=crops, batch_size=batch_size, epochs=epochs,
                      workers=workers, device=device)
        speed = {mode: [] for mode in MODES}
        at_res = {r: [] for r in students}
        progressive = []
        for run in range(repeats):   # everything in turn, so that load drift hits every figure alike
            for mode in MODES:
                speed[mode].append(mode_speed(mode, data, store.path, specs, folder / f"{mode}{run}", **common))
            for r in students:
                at_res[r].append(speed["stored"][-1] if r == res else mode_speed(
                    "stored", data, store.path, specs, folder / f"stored-{r}px-{run}",
                    **{**common, "res": r}))
            progressive.append(mode_speed("stored", data, store.path, specs, folder / f"progressive{run}",
                                          min_res=ramp.min_res, ramp_start=ramp.ramp_start,
                                          ramp_end=ramp.ramp_end, res_step=ramp.step, **common))
        crc_s = crc_seconds_per_image(index)
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
        f"Changed-image check (the store's CRC32C of each image, compared as the loader reads the bytes): "
        f"{crc_s * 1e6:.1f} us CPU per image = **{crc_s / (med_cpu['stored'] / 1000 * crops):.2%}** of the "
        f"stored-label run's CPU time per image ({crops} crops x {med_cpu['stored']:.1f} ms); target <= 1 %: "
        f"{met(crc_s <= 0.01 * med_cpu['stored'] / 1000 * crops)}.",
        "",
        "| label round in RAM (RoundData: boxes, flips, ids, probs) | per image | ImageNet, 1,281,167 images |",
        "|---|---|---|",
        f"| C={crops} crops, k={topk}, {len(index.classes)} classes (uint16 ids) | {round_bytes:.0f} B | "
        f"{gib:.2f} GiB ({round_bytes * IMAGENET_IMAGES / 1e6:.0f} MB) |",
        "",
        "The loader holds one round per process (the previous one is released before the next is read): "
        "that is its peak label RAM, per rank under DDP.",
        *resolution_lines(at_res, progressive, speed["stored"], ramp, res, epochs),
    ]
    click.echo("\n".join(lines))


def resolution_lines(at_res: dict, progressive: list, fixed: list, ramp: ResSchedule, res: int,
                     epochs: int) -> list[str]:
    """The student-resolution tables: stored-label speed per res, progressive against fixed wall time."""
    fmt = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    med = {r: [statistics.median(v[i] for v in runs) for i in range(2)] for r, runs in at_res.items()}
    lines = ["", f"Stored labels (made at {res} px) serving students at other resolutions (`--res R`):", "",
             f"| student res | img/s (runs) | CPU ms/img (runs) | speed relative to {res} px: wall, CPU | "
             f"pixels relative |", "|---|---|---|---|---|"]
    for r, runs in sorted(at_res.items()):
        rel = (f"{med[r][0] / med[res][0]:.2f}, {med[res][1] / med[r][1]:.2f}" if res in med else "")
        lines.append(f"| {r} px | {fmt(v[0] for v in runs)} | {fmt(v[1] for v in runs)} | {rel} | "
                     f"{(r / res) ** 2:.2f} |")
    wall_fixed, wall_prog = (statistics.median(v[2] for v in runs) for runs in (fixed, progressive))
    lines += ["", f"Progressive resizing against a fixed {res} px run, stored labels, {epochs} epochs each, "
              f"in turn: `--min-res {ramp.min_res} --ramp-start {ramp.ramp_start} --ramp-end {ramp.ramp_end} "
              f"--res-step {ramp.step}` ({ramp.describe(epochs)}).", "",
              "| run | wall s (runs) | wall ratio | pixels rendered |", "|---|---|---|---|",
              f"| fixed {res} px | {fmt(v[2] for v in fixed)} | 1.00 | 1.00 |",
              f"| progressive | {fmt(v[2] for v in progressive)} | **{wall_prog / wall_fixed:.2f}** | "
              f"{ramp.pixel_fraction(epochs):.2f} |", "",
              "Wall s: the whole `mealv2 train` run, start-up (index, store check, model) and every epoch "
              "included; start-up costs both runs the same, so on short runs it pulls the wall ratio towards 1."]
    return lines
