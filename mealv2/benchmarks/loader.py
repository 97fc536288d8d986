"""`mealv2 bench loader`: crops/s of each crop loader alone (no model), beside a bare loop.

For every installed loader on the device (DALI and torch, which decode on a GPU where there is
one; on a GPU also torch-cpu, which decodes on the CPU threads; on a CPU also the torch loader's
device path, run on the CPU), at C = 1 and C = 4 crops per image of ImageNet-sized JPEGs
(500 x 375, quality 90) rendered at 224 px, the loader as the commands run it (reading, CRC32C,
the request/batch plumbing, the batch on the device, flipped and normalised) is timed beside a
bare loop that decodes each image once with the same decoder and renders its C crops with the
same resize on the same threads, and makes what the loader yields on that device (normalised
float for a CPU run, whose student reads it; on a GPU, uint8 from the CPU threads, which the GPU
normalises, or the device path's normalised batch). Target: every loader >= 0.8x its bare loop.
The torch loader's bare loop also runs on worker processes instead of threads: which of the two
the CPU path should use.

Beside throughput, the CPU time per crop of the thread that takes the batches: the thread that
trains pays it on top of its step (target: <= 10 us for the torch loader).

Each figure is the best of ``--repeats`` timed passes over the images (the loaders' warm-up,
DALI's pipeline build, is outside the timing), so a shared machine's load inflates none.
"""
from __future__ import annotations

import multiprocessing
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import click
import numpy as np
import torch

from ..cli.params import POSITIVE, device_option

from ..common.data.loaders.base import CropRequest, View, normalise
from ..common.data.crops import CropParams, boxes_to_relative, sample_crops
from ..common.data.dataset import build_index
from ..common.data.loaders.registry import LOADERS, available_cores, installed, iterate
from ..common.models.runtime import machine_description, resolve_device
from ..common.models.teachers import NORMS
from ..common.data.loaders.torch import decode_cpu, decode_jpeg_rgb, jpeg_kind, render_batch, render_crops
from .common import make_photo_dataset, met

TARGET = 0.8
SHAPE = (375, 500)   # ImageNet's most common size (h, w)


def _requests(index, crops: int, res: int, batch: int) -> list[CropRequest]:
    ids = np.arange(len(index))
    boxes, flips = sample_crops(0, 0, ids, index.sizes[ids], crops, CropParams(res=res))
    return [CropRequest(ids[a:a + batch], boxes[a:a + batch], flips[a:a + batch]) for a in range(0, len(ids), batch)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(name: str, index, requests, view: View, crops: int, device: torch.device, threads: int,
                **options) -> tuple[float, float]:
    """Seconds of one pass of loader ``name`` over ``requests``, its first batch yielded before the
    clock, and the CPU seconds per crop of the thread that takes the batches (``time.thread_time``):
    what loading costs the thread that trains."""
    batches = iterate(name, index, iter(requests), [view], crops, batch_size=len(requests[0].ids),
                      device=str(device), threads=threads, **options)
    next(batches)
    _sync(device)
    start, cpu, taken = time.perf_counter(), time.thread_time(), 0
    for batch in batches:
        taken += len(batch.views[0])
    cpu = time.thread_time() - cpu
    _sync(device)
    return (time.perf_counter() - start) * len(requests) / max(1, len(requests) - 1), cpu / max(1, taken)


# ---- bare loops: the same decoder and resize, nothing else ----------------------------------------
def _decode_and_render(path: str, boxes: np.ndarray, flips: np.ndarray, view: View, normalised: bool) -> np.ndarray:
    data = np.fromfile(path, dtype=np.uint8)
    (crops,) = render_crops(decode_cpu(data, jpeg_kind(data), path), boxes, flips, [view])
    return (normalise(crops, view.mean, view.std) if normalised else crops).numpy()


def bare_threads(index, requests, view: View, device: torch.device, threads: int, normalised: bool,
                 pool_type=ThreadPoolExecutor) -> float:
    """The torch loader's CPU work on a pool of ``threads`` threads (or processes, each on one
    torch thread): decode each image once, resize its C boxes to uint8 (and normalise them, as a
    CPU run's loader threads do, when ``normalised``), results held."""
    paths = [str(index.path(int(i))) for r in requests for i in r.ids]
    boxes = [b for r in requests for b in boxes_to_relative(r.boxes)]
    flips = [f for r in requests for f in r.flips]
    work = partial(_decode_and_render, view=view, normalised=normalised)
    with pool_type(threads) as pool:
        list(pool.map(work, paths[:threads], boxes, flips))   # start-up
        start = time.perf_counter()
        list(pool.map(work, paths, boxes, flips))
        return time.perf_counter() - start


def bare_device(index, requests, view: View, device: torch.device, threads: int, normalised: bool = True) -> float:
    """The torch loader's device path bare: bytes read on the threads, one batched decode_jpeg per
    request on ``device``, its crops rendered there in one batch (normalised: that path has no
    uint8 stage, so ``normalised`` changes nothing), on one thread of its own as the loader's
    producer renders (on the CPU torch's ops ran several times slower on the main thread, with
    its intra-op threads, on the loaded 2-core machine of BENCHMARKS.md)."""
    def run() -> float:
        with ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            for req in requests:
                encoded = list(pool.map(lambda i: torch.from_numpy(np.fromfile(index.path(int(i)), np.uint8)),
                                        req.ids))
                render_batch(decode_jpeg_rgb(encoded, device=device), boxes_to_relative(req.boxes), req.flips,
                             [view])
            _sync(device)
            return time.perf_counter() - start

    with ThreadPoolExecutor(1) as renderer:
        return renderer.submit(run).result()


def bare_dali(index, requests, view: View, device: torch.device, threads: int, normalised: bool) -> float:
    """DALI's decoder and ROI resize alone (and its normalisation when ``normalised``), fed the same
    bytes and boxes, on the same threads."""
    from nvidia.dali import fn, pipeline_def, types

    crops, batch = requests[0].boxes.shape[1], len(requests[0].ids)

    def source():
        for req in requests:
            rel = boxes_to_relative(req.boxes)
            yield ([np.fromfile(index.path(int(i)), np.uint8) for i in req.ids],
                   list(np.ascontiguousarray(rel[..., :2])), list(np.ascontiguousarray(rel[..., :2] + rel[..., 2:])))

    @pipeline_def(batch_size=batch, num_threads=threads, prefetch_queue_depth=2, exec_dynamic=True,
                  device_id=device.index or 0 if device.type == "cuda" else None)
    def pipe():
        encoded, start, end = fn.external_source(source=source(), num_outputs=3, batch=True,
                                                 dtype=[types.UINT8, types.FLOAT, types.FLOAT])
        images = fn.decoders.image(encoded, device="mixed" if device.type == "cuda" else "cpu", output_type=types.RGB)
        outs = [fn.resize(images, size=[view.res, view.res], roi_start=start[c], roi_end=end[c],
                          roi_relative=True, antialias=True, interp_type=types.INTERP_LINEAR) for c in range(crops)]
        return tuple(fn.crop_mirror_normalize(o, dtype=types.FLOAT, output_layout="CHW",
                                              mean=[255 * m for m in view.mean], std=[255 * s for s in view.std])
                     if normalised else o for o in outs)

    p = pipe()
    p.build()
    p.run()   # the first batch, as the loader's, outside the clock
    start = time.perf_counter()
    try:
        while True:
            p.run()
    except StopIteration:
        pass
    return (time.perf_counter() - start) * len(requests) / max(1, len(requests) - 1)


# Per device type, the rows: (row name, loader, the loader's options, its bare loop). On a CPU the torch
# loader's device path (a GPU run's: batched decode, crops rendered on the device) runs on the CPU too.
CASES = {"cpu": [("dali", "dali", {}, bare_dali), ("torch", "torch", {}, bare_threads),
                 ("torch, device path on the CPU", "torch", {"decode_on": "device"}, bare_device)],
         "cuda": [("dali", "dali", {}, bare_dali), ("torch", "torch", {}, bare_device),
                  ("torch-cpu", "torch-cpu", {}, bare_threads)]}


def measure(index, device: torch.device, threads: int, res: int, batch: int, repeats: int,
            crops_options=(1, 4)) -> list[dict]:
    """A row per installed loader and C: crops/s (best of ``repeats``) of the loader, of its bare
    loop producing what the loader yields (normalised float for a CPU run: the CPU is the device
    that normalises), and of the bare decode + resize alone (uint8); and the CPU time per crop of
    the thread that takes the loader's batches (the least of ``repeats``)."""
    view = View(res, *NORMS["imagenet"])
    cpu = device.type == "cpu"
    rows = []
    for row, name, options, bare in (c for c in CASES[device.type] if installed(c[1])):
        for crops in crops_options:
            requests = _requests(index, crops, res, batch)
            best = {"loader": float("inf"), "bare": float("inf"), "uint8": float("inf")}
            thread = float("inf")
            for _ in range(repeats):   # interleaved, so a change of load falls on all
                seconds, per_crop = time_loader(name, index, requests, view, crops, device, threads, **options)
                best["loader"], thread = min(best["loader"], seconds), min(thread, per_crop)
                best["bare"] = min(best["bare"], bare(index, requests, view, device, threads, normalised=cpu))
                if cpu and bare is not bare_device:   # the device path has no uint8 stage
                    best["uint8"] = min(best["uint8"], bare(index, requests, view, device, threads, normalised=False))
            rows.append({"name": row, "crops": crops, "thread_us": thread * 1e6,
                         **{k: len(index) * crops / v for k, v in best.items()}})
    if installed("torch") and cpu:
        requests = _requests(index, 4, res, batch)
        # spawned (a child forked from a process running torch's and DALI's thread pools can hang),
        # one torch thread each, as the threads use
        processes = partial(ProcessPoolExecutor, mp_context=multiprocessing.get_context("spawn"),
                            initializer=torch.set_num_threads, initargs=(1,))
        best = {k: len(index) * 4 / min(bare_threads(index, requests, view, device, threads, normalised, processes)
                                        for _ in range(repeats)) for k, normalised in (("bare", True), ("uint8", False))}
        rows.append({"name": "torch's bare loop on processes", "crops": 4, "loader": None, **best})
    return rows


def table(rows: list[dict], cores: int) -> list[str]:
    lines = ["| loader | C | loader crops/s | bare loop crops/s | loader / bare | >= 0.8 | loader crops/s per core "
             "| train-thread us/crop | bare decode + resize alone (uint8) crops/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        uint8 = f"{r['uint8']:.0f}" if r.get("uint8") else "-"   # 0: not measured (no uint8 stage)
        if r["loader"] is None:
            lines.append(f"| {r['name']} | {r['crops']} | - | {r['bare']:.0f} | - | - | - | - | {uint8} |")
            continue
        ratio = r["loader"] / r["bare"]
        lines.append(f"| {r['name']} | {r['crops']} | {r['loader']:.0f} | {r['bare']:.0f} | {ratio:.2f} | "
                     f"{met(ratio >= TARGET)} | {r['loader'] / cores:.0f} | {r['thread_us']:.1f} | {uint8} |")
    return lines


@click.command("loader")
@click.option("--images", type=POSITIVE, default=128, show_default=True,
              help="Generated 500 x 375 JPEGs (quality 90).")
@click.option("--res", type=POSITIVE, default=224, show_default=True)
@click.option("--batch", type=POSITIVE, default=32, show_default=True, help="Images per request.")
@click.option("--repeats", type=POSITIVE, default=3, show_default=True, help="Timed passes; the best is kept.")
@device_option
@click.option("--workers", type=POSITIVE, default=available_cores, show_default="the cores this process may use",
              help="Decoding threads, for the loaders and their bare loops alike.")
def bench_loader(images, res, batch, repeats, device, workers):
    """Crops/s of each installed crop loader against a bare decode-and-resize loop (target >= 0.8x)."""
    dev = resolve_device(device)
    folder = Path(tempfile.mkdtemp(prefix="mealv2-bench-loader-"))
    try:
        index = build_index(make_photo_dataset(folder / "data", 8, -(-images // 8), shape=SHAPE))
        rows = measure(index, dev, workers, res, min(batch, len(index)), repeats)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    missing = [n for n in LOADERS if not installed(n)]
    click.echo("\n".join([
        f"`mealv2 bench loader --images {images} --workers {workers} --device {device}` on "
        f"{machine_description(dev.type)}", "",
        f"{len(index)} JPEGs of {SHAPE[1]} x {SHAPE[0]} (quality 90), C crops each at {res} px, {batch} images per "
        f"request, {workers} threads, {dev.type}; best of {repeats} passes"
        + (f"; not installed: {', '.join(missing)}" if missing else "") + ". Per core: over the "
        f"{workers} threads' cores.", "", *table(rows, workers)]))
