"""`mealv2 bench startup`: seconds from `mealv2 train` start to its first step at ImageNet size.

The case is made on the spot: a CSV of ``--images`` rows (1,281,167 = ImageNet's train set)
that points many rows at a few small real JPEG files, and a complete label store of that size
written through the real writer (``LabelStore.write_shard``) with ImageNet-like synthetic
top-k data (no teachers run). `mealv2 train` is then started as a user starts it, in a fresh
process, three times:

1. cold: no dataset index cache: every row's file is stat-ed and its header read;
2. warm: the index cache written by the cold start is present;
3. reference: one parallel pass over the file headers (``probe_images``, the pass an
   uncached index makes), timed in its own process.

Each start runs until its loader yields the first batch; the figure is the wall time from
before the process is created (Python and torch imports included) to that moment, and the
process's peak resident memory then. The files are few and stay in the page cache, so the
figures leave out the disk: a cold start on a cold cache of 1.28 M real files also waits for
the file system, and so does the reference pass.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import crc32c
import numpy as np
from PIL import Image

from ..cli.params import POSITIVE, loader_option
from ..common.data.crops import CropParams, sample_crops
from ..common.data.dataset import DatasetIndex
from ..common.store.label_store import LabelStore
from ..common.data.targets import encode_topk
from ..common.models.runtime import machine_description
from .common import make_photo_dataset, met
from .label import synthetic_ensemble_probs, synthetic_store_attrs

IMAGENET_TRAIN = 1_281_167

# Runs in the child: `mealv2 train` as the CLI runs it, stopped when the loader yields its first batch.
_CHILD = """
import json, os, resource, sys, time
from mealv2.stage2_train import loader
epoch = loader.TrainLoader.epoch
def first_batch(self, *args, **kwargs):
    for batch in epoch(self, *args, **kwargs):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        with open(os.environ["MEALV2_BENCH_REPORT"], "w") as f:
            json.dump({"time": time.time(), "peak_rss": peak}, f)
        sys.stdout.flush()
        os._exit(0)
loader.TrainLoader.epoch = first_batch
from mealv2.cli import main
sys.argv = ["mealv2", *sys.argv[1:]]
main()
"""

_PROBE = """
import json, os, resource, sys, time
from mealv2.common.data.dataset import probe_images
paths = open(sys.argv[1]).read().split("\\n")
t = time.perf_counter()
probe_images(paths, int(sys.argv[2]))
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


# ---- the case ------------------------------------------------------------------------------------

def make_case(folder: Path, images: int, files: int, rounds: int, crops: int, k: int, shard_size: int,
              threads: int = 2, photos: bool = False) -> tuple[Path, Path, DatasetIndex]:
    """CSV of ``images`` rows over ``files`` small JPEGs (1000 classes) and its complete store; also
    the index `build_index` makes of it (made here without reading the files: the store needs its
    fingerprint). Each row names its own path (a CSV may not list a file twice): row i is
    ``v{i // files}/{i % files}.jpg``, through one symlink ``v{n} -> img`` per ``files`` rows.
    ``photos``: the files are ImageNet-sized (`make_photo_dataset`'s), for measures that decode
    them (`bench gpu`'s loaders)."""
    rng = np.random.default_rng(0)
    sizes, names = [], []
    if photos:
        make_photo_dataset(folder / "img", 1, files)
        for path in sorted((folder / "img").rglob("*.jpg")):
            with Image.open(path) as im:
                sizes.append(im.size[::-1])
            names.append(path.relative_to(folder).as_posix())
    else:
        (folder / "img").mkdir(parents=True)
        for j in range(files):
            h, w = (int(v) for v in rng.integers(48, 97, 2))
            name = f"img/{j:04d}.jpg"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name, quality=85)
            sizes.append((h, w))
            names.append(name)
    crcs = [crc32c.crc32c((folder / name).read_bytes()) for name in names]
    classes = tuple(f"n{c:04d}" for c in range(min(1000, images)))   # every class has a row
    which = np.arange(images) % files
    for v in range(-(-images // files)):
        (folder / f"v{v:05d}").symlink_to("img", target_is_directory=True)
    relpaths = tuple(f"v{i // files:05d}/{names[j][len('img/'):]}" for i, j in enumerate(which.tolist()))
    labels = (np.arange(images) * len(classes) // images).astype(np.int64)
    csv = folder / "train.csv"
    with open(csv, "w") as f:
        f.write("path,label\n")
        f.writelines(f"{path},{classes[c]}\n" for path, c in zip(relpaths, labels.tolist()))
    index = DatasetIndex(root=folder, relpaths=relpaths, labels=labels, classes=classes,
                         sizes=np.asarray(sizes, np.int32)[which])

    crop = CropParams()
    attrs = synthetic_store_attrs(classes, k, crops, shard_size, crop, images)
    attrs["dataset"]["fingerprint"] = index.fingerprint
    store = LabelStore.create_or_resume(folder / "labels.zarr", attrs, rounds, labels.astype(np.int32))
    # One shard's worth of ImageNet-like crops and top-k data, written into every (round, shard):
    # valid labels (boxes are relative, so they fit any image) that compress like real ones, made
    # in seconds instead of the hours of sampling and teachers.
    n = min(shard_size, images)
    boxes, flips = sample_crops(0, 0, np.arange(n), index.sizes[:n], crops, crop)
    ids, codes = encode_topk(synthetic_ensemble_probs(n, crops, len(classes)), k)
    ids = ids.reshape(n, crops, k).numpy().astype(store.id_dtype)
    codes = codes.reshape(n, crops, k + 1).numpy()
    row_crcs = np.asarray(crcs, np.uint32)[which]

    def write(rs: tuple[int, int]) -> None:
        r, s = rs
        a, b = store.shard_range(s)
        store.write_shard(r, s, boxes[:b - a], flips[:b - a], ids[:b - a], codes[:b - a], row_crcs[a:b])

    # round 0 of every shard first (it records the images' CRCs), then the other rounds
    with ThreadPoolExecutor(threads) as pool:
        for r in range(rounds):
            list(pool.map(write, [(r, s) for s in range(store.num_shards)]))
    store.pack()
    return csv, store.path, index


# ---- measures ------------------------------------------------------------------------------------

def time_to_first_step(csv: Path, store: Path, run: Path, cache: Path, args: list[str]) -> dict:
    """Seconds from creating a `mealv2 train` process to its loader's first batch, and its peak RSS."""
    report = run.with_suffix(".json")
    env = {**os.environ, "MEALV2_CACHE": str(cache), "MEALV2_BENCH_REPORT": str(report)}
    cmd = [sys.executable, "-c", _CHILD, "train", str(csv), "--labels", str(store), "-o", str(run), *args]
    with open(run.with_suffix(".log"), "w") as log:
        started = time.time()
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode or not report.exists():
        raise click.ClickException(f"`mealv2 train` stopped before its first step (exit {done.returncode}); "
                                   f"its output: {run.with_suffix('.log')}")
    out = json.loads(report.read_text())
    return {"seconds": out["time"] - started, "peak_rss": out["peak_rss"]}


def header_pass(csv: Path, workers: int, folder: Path) -> float:
    """Seconds of one parallel pass over the rows' file headers, in a fresh process."""
    root = csv.parent
    lines = csv.read_text().splitlines()[1:]
    listing = folder / "paths.txt"
    listing.write_text("\n".join(str(root / line.rsplit(",", 1)[0]) for line in lines))
    out = subprocess.run([sys.executable, "-c", _PROBE, str(listing), str(workers)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)["seconds"]


# ---- command -------------------------------------------------------------------------------------

@click.command("startup")
@click.option("--images", type=POSITIVE, default=IMAGENET_TRAIN, show_default=True,
              help="Rows of the generated CSV (images of the index and the store).")
@click.option("--files", type=POSITIVE, default=64, show_default=True, help="Distinct JPEG files the rows point at.")
@click.option("--rounds", type=POSITIVE, default=4, show_default=True, help="Label rounds of the store (`label`'s default).")
@click.option("--crops-per-image", "crops", type=POSITIVE, default=4, show_default=True)
@click.option("--topk", type=POSITIVE, default=5, show_default=True)
@click.option("--shard-size", type=POSITIVE, default=1024, show_default=True)
@click.option("--arch", "-a", default="test_resnet", show_default=True, help="Student of the timed `train`.")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True, help="`train --batch-size`.")
@click.option("--workers", type=POSITIVE, default=4, show_default=True,
              help="`train --workers`; the index reads headers on max(workers, 8) threads.")
@loader_option
@click.option("--device", default="cpu", show_default=True, help="`train --device`.")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path),
              help="Make the case in this folder and keep it (default: a temporary folder, removed).")
def bench_startup(images, files, rounds, crops, topk, shard_size, arch, batch_size, workers, loader, device, keep):
    """Seconds from `train` start to the first step at ImageNet size, cold and warm, and peak RAM."""
    folder = keep or Path(tempfile.mkdtemp(prefix="mealv2-bench-startup-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        case = folder / "case"
        if case.exists():
            shutil.rmtree(case)
        t = time.perf_counter()
        csv, store, _ = make_case(case, images, files, rounds, crops, topk, shard_size)
        made = time.perf_counter() - t
        cache = folder / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        args = ["-a", arch, "--epochs", "1", "--batch-size", str(batch_size), "--workers", str(workers),
                "--loader", loader, "--device", device]
        cold = time_to_first_step(csv, store, folder / "cold", cache, args)
        warm = time_to_first_step(csv, store, folder / "warm", cache, args)
        reference = header_pass(csv, max(workers, 8), folder)
        store_mib = LabelStore.open(store).bytes_on_disk() / 2**20
        store_files = sum(1 for f in store.rglob("*") if f.is_file())
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)

    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    command = "mealv2 bench startup" + (f" --images {images}" if images != IMAGENET_TRAIN else "")
    click.echo("\n".join([
        f"`{command}` on {machine_description(device)}",
        "",
        f"Case: a CSV of {images:,} rows over {files} small JPEG files (1000 classes) and a complete store of "
        f"{rounds} rounds x {crops} crops, k={topk}, shards of {shard_size} ({store_mib:.0f} MiB in {store_files:,} "
        f"files, written through LabelStore.write_shard and packed in {made:.0f} s); `mealv2 train {' '.join(args)}`, timed from process creation "
        f"to the loader's first batch.",
        "",
        "| measure | value | reference | target | met |",
        "|---|---|---|---|---|",
        f"| cold start (no index cache) | {cold['seconds']:.1f} s | one parallel pass over the file headers "
        f"({max(workers, 8)} threads): {reference:.1f} s | <= 1.5x: {1.5 * reference:.1f} s | "
        f"{cold['seconds'] / reference:.2f}x {met(cold['seconds'] <= 1.5 * reference)} |",
        f"| warm start (index cache present) | {warm['seconds']:.1f} s | | <= 15 s | {met(warm['seconds'] <= 15)} |",
        f"| peak RAM at the first step, cold / warm | {gib(cold['peak_rss'])} / {gib(warm['peak_rss'])} | | <= 2 GB "
        f"| {met(max(cold['peak_rss'], warm['peak_rss']) <= 2e9)} |",
        "",
        "Both starts verify the whole store (CRC32C of every chunk file) and load round 0; the files are few and "
        "stay in the page cache, so neither the starts nor the reference pass wait for a disk.",
    ]))
