"""`mealv2 bench label`: stage-1 throughput and store size against their targets, in one run.

1. crops/s of the whole labeller (the `mealv2 label` loop: sampling, DALI decode and crop,
   teachers, top-k, store writes on its background writer) next to the bare ensemble forward on
   the same crops, pre-rendered, in batches of the same shape (target: ratio >= 0.9), and next to
   the same labeller writing each shard in its loop (what the background writer saves);
2. bytes per crop of that store next to FKD's encoding at the same k (target: <= half);
3. the largest KL(fp32 top-k target || target rebuilt from the store) over its crops
   (target: <= 1e-3);
4. the same size and KL figures for an ImageNet-like case: 1000 classes, a synthetic
   two-teacher ensemble softmax whose crops of one image agree the way real ones do,
   written through the real store code (``LabelStore.write_shard``), because bytes per crop
   depend strongly on the class count.

FKD's encoding (github.com/szq0214/FKD, FKD_SLG/generate_soft_label.py with --use_fp16):
per image one ``torch.save([coords, flips, np.float16(stack([ids, values]))])`` file,
i.e. per crop 4 fp16 box coordinates (8 B), one bool flip (1 B), k class ids and k values
both as fp16 (4k B): 9 + 4k B, 29 B at k=5. Its fp32-coordinate variant is 17 + 4k B.
The per-file container overhead is measured separately and not counted in those figures.
"""
from __future__ import annotations

import dataclasses
import io
import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from ..cli.params import POSITIVE, LocalPath, device_option
from ..common.data.crops import CropParams, sample_crops
from ..common.data.dataset import DatasetIndex, build_index
from ..common.data.targets import encode_topk, reconstruct_targets
from ..common.models.distributed import DistInfo
from ..common.models.runtime import Runtime, machine_description
from ..common.models.teachers import Ensemble, load_teacher, split_specs
from ..common.store.label_store import LabelStore
from ..stage1_label.config import LabelConfig
from ..stage1_label.labeler import label_shards, store_attrs
from .common import DEFAULT_TEACHERS, make_photo_dataset, met, random_teachers

# ---- inputs ------------------------------------------------------------------------------------

def synthetic_ensemble_probs(num_images: int, crops: int, num_classes: int = 1000, teachers: int = 2,
                             seed: int = 0):
    """ImageNet-like averaged ensemble softmax for ``crops`` crops of each image.

    Per image: a true class and 8 confusable classes (drawn anywhere in the id range, no help
    from ImageNet's neighbouring ids) over Gaussian background logits; per crop: a random
    informativeness (crops that show less of the object are flatter) and crop noise; per
    teacher: its own noise. Calibrated to a median top-1 probability of ~0.6 with ~86% of an
    image's crops sharing their top-1 class.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(num_classes, (num_images,), generator=g)
    base = torch.randn(num_images, num_classes, generator=g)
    base[torch.arange(num_images), y] += 6 + 12 * torch.rand(num_images, generator=g)
    confusers = torch.randint(num_classes, (num_images, 8), generator=g)
    base.scatter_add_(1, confusers, 10 * torch.rand(num_images, 8, generator=g))
    informative = 0.5 + 0.5 * torch.rand(num_images, crops, 1, generator=g)
    z = informative * base[:, None] + 0.5 * torch.randn(num_images, crops, num_classes, generator=g)
    p = sum(torch.softmax(z + 0.5 * torch.randn(z.shape, generator=g), -1) for _ in range(teachers)) / teachers
    return p.reshape(num_images * crops, num_classes)


# ---- measures ----------------------------------------------------------------------------------

def fkd_bytes_per_crop(k: int, fp16_coords: bool = True) -> int:
    return (8 if fp16_coords else 16) + 1 + 4 * k


def fkd_file_bytes_per_crop(crops: int, k: int) -> float:
    """Bytes per crop of one FKD per-image file as FKD writes it (torch.save of the list)."""
    rng = np.random.default_rng(0)
    state = [np.float16(rng.random((crops, 4))), rng.random(crops) < 0.5,
             np.float16(np.stack([rng.integers(0, 1000, (crops, k)), rng.random((crops, k))], axis=1))]
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.tell() / crops


def kl_to_stored(p, ids, codes):
    """Per-crop KL(fp32 top-k target || target rebuilt from the stored ids and codes)."""

    p = p.double()
    k = ids.shape[1]
    top = p.gather(1, ids)
    rest = ((1 - top.sum(1, keepdim=True)) / max(p.shape[1] - k, 1)).clamp_min(0)
    ref = rest.expand(-1, p.shape[1]).clone().scatter_(1, ids, top)
    q = reconstruct_targets(ids, codes, p.shape[1]).double()
    return torch.xlogy(ref, ref).sum(1) - (ref * q.log()).sum(1)


def synthetic_store_attrs(classes, k, crops, shard_size, crop: CropParams, num_images, teachers=()) -> dict:
    return {"classes": list(classes), "topk": k, "temperature": 1.0, "seed": 0, "crops_per_image": crops,
            "shard_size": shard_size, "crop": crop.to_attrs(), "teachers": list(teachers),
            "teacher_precision": "fp32", "dataset": {"num_images": num_images, "fingerprint": "synthetic", "skipped": []}}


def imagenet_like_case(folder: Path, num_images: int, crops: int, k: int, shard_size: int = 1024) -> dict:
    """Bytes/crop and KL of a 1000-class synthetic ensemble written through LabelStore."""

    rng = np.random.default_rng(0)
    sizes = np.stack([rng.integers(250, 501, num_images), rng.integers(300, 501, num_images)], 1)
    crop = CropParams()
    boxes, flips = sample_crops(0, 0, np.arange(num_images), sizes, crops, crop)
    p = synthetic_ensemble_probs(num_images, crops)
    ids, codes = encode_topk(p, k)
    attrs = synthetic_store_attrs([f"n{i:04d}" for i in range(1000)], k, crops, shard_size, crop, num_images)
    store = LabelStore.create_or_resume(folder / "imagenet_like", attrs, 1, np.zeros(num_images, np.int32))
    # the same shards also into a store without fsync, interleaved: what durability costs the write path
    unsynced = LabelStore.create_or_resume(folder / "imagenet_like_nofsync", attrs, 1, np.zeros(num_images, np.int32))
    unsynced.fsync = False
    ids_np = ids.reshape(num_images, crops, k).numpy().astype(np.uint16)
    codes_np = codes.reshape(num_images, crops, k + 1).numpy()
    seconds = {True: [], False: []}
    for s in range(store.num_shards):
        a, b = store.shard_range(s)
        for target in (store, unsynced) if s % 2 else (unsynced, store):
            t = time.perf_counter()
            target.write_shard(0, s, boxes[a:b], flips[a:b], ids_np[a:b], codes_np[a:b], np.zeros(b - a, np.uint32))
            seconds[target.fsync].append(time.perf_counter() - t)
    store.pack()
    rd = LabelStore.open(store.path).read_round(0)
    kl = kl_to_stored(p, torch.from_numpy(rd.ids.reshape(-1, k).astype(np.int64)),
                      torch.from_numpy(rd.probs.reshape(-1, k + 1)))
    n = num_images * crops
    per_array = {name: sum(f.stat().st_size for f in (store.path / name / "c").rglob("*") if f.is_file()) / n
                 for name in ("boxes", "flips", "ids", "probs")}
    top1 = p.max(1).values
    synced, plain = float(np.median(seconds[True])), float(np.median(seconds[False]))
    return {"crops": n, "bytes_per_crop": store.data_bytes() / n, "per_array": per_array,
            "shard_write_s": (synced, plain), "crops_per_shard": min(shard_size, num_images) * crops,
            "kl_max": float(kl.max()), "kl_mean": float(kl.mean()), "top1_median": float(top1.median()),
            "crops_sharing_top1": float((ids.reshape(num_images, crops, k)[:, :, 0]
                                         == ids.reshape(num_images, crops, k)[:, :1, 0]).float().mean())}


def labeller_case(data: Path | None, teachers: list[str], folder: Path, res: int, crops: int, k: int,
                  images: int, batch_size: int, device: str, workers: int, classes: int, repeats: int,
                  shard_size: int = 1024, teacher_precision: str = "fp32") -> dict:
    """The real labeller over ``images`` images, and the bare ensemble forward on the same crops.

    A first labeller pass (not timed) records the crops its teachers see, in its batch shapes, and
    warms every shape up: the bare forward runs on those very tensors, whichever backend rendered
    them. Then passes alternate (bare, labeller, labeller writing in its loop, bare, ...) so that
    each labeller pass is compared with the bare passes just before and after it: on a shared
    machine the load drifts. The labeller runs twice per repeat: with its background shard writer
    and with each shard written in its loop (``write_depth`` 0, as before the writer), to show
    what the writer saves. Wall-clock and process CPU time (all threads) are both kept.
    """

    if data is None:
        data = make_photo_dataset(folder / "data", classes, -(-images // classes))
    full = build_index(data, workers=max(workers, 8))
    pick = np.sort(np.random.default_rng(0).choice(len(full), size=min(images, len(full)), replace=False))
    # a subset that keeps the dataset's classes, so teachers with the full head still fit
    index = DatasetIndex(root=full.root, relpaths=tuple(full.relpaths[i] for i in pick), labels=full.labels[pick],
                         classes=full.classes, sizes=full.sizes[pick])
    specs = split_specs(teachers) or random_teachers(DEFAULT_TEACHERS, len(full.classes), folder, res)
    runtime = Runtime.create(device, teacher_precision)
    dev = runtime.device
    loaded = [load_teacher(spec, full.classes, res) for spec in specs]
    cfg = LabelConfig(data=str(data), teachers=[t.spec for t in loaded], out="", rounds=1,
                      crops_per_image=crops, res=res, topk=k, batch_size=batch_size,
                      device=dev.type, workers=workers, shard_size=shard_size, progress=False,
                      teacher_precision=teacher_precision)
    attrs = store_attrs(cfg, index, loaded)
    seen: list = []
    rendered: list = []
    in_forward = [0.0]

    class RecordingEnsemble(Ensemble):
        """Keeps each batch's fp32 ensemble probabilities (to compare with what the store keeps)
        and the time spent in the forward (the rest of the labeller's time is waiting for
        decoded crops, top-k and writes); in the first pass, the crops themselves."""

        record_views = False

        def probs(self, views):
            if self.record_views:
                rendered.append([v.clone() for v in views])
            runtime.synchronize()
            t = time.perf_counter()
            p = super().probs(views)
            seen.append(p.detach().to("cpu", copy=True))
            in_forward[0] += time.perf_counter() - t
            return p

    ensemble = RecordingEnsemble(loaded, runtime, cfg.temperature)
    n = len(index) * crops

    def bare() -> tuple[float, float]:
        runtime.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        for views in rendered:
            Ensemble.probs(ensemble, views)
        runtime.synchronize()
        return n / (time.perf_counter() - wall), (time.process_time() - cpu) / n

    def label(name: str, write_depth: int | None = None) -> dict:
        seen.clear()
        in_forward[0] = 0.0
        store = LabelStore.create_or_resume(folder / name, attrs, 1, index.labels)
        writes = []
        write_shard = store.write_shard

        def timed_write(*args, **kwargs):   # in whichever thread writes: the labeller's or its writer's
            t = time.perf_counter()
            write_shard(*args, **kwargs)
            writes.append(time.perf_counter() - t)

        store.write_shard = timed_write
        run_cfg = cfg if write_depth is None else dataclasses.replace(cfg, write_depth=write_depth)
        cpu = time.process_time()
        done, seconds = label_shards(run_cfg, store, index, ensemble, DistInfo())
        assert done == n
        store.pack()   # as `mealv2 label` does once its shards are written
        return {"rate": n / seconds, "cpu": (time.process_time() - cpu) / n, "store": store,
                "forward_share": in_forward[0] / seconds, "write_s": sum(writes), "seconds": seconds}

    ensemble.record_views = True
    label("warmup")      # records the crops; compiles kernels and sizes buffers of every batch shape
    ensemble.record_views = False
    bares = [bare()]
    labels, inline = [], []
    for i in range(repeats):
        labels.append(label(f"store{i}"))
        inline.append(label(f"inline{i}", write_depth=0))
        bares.append(bare())
    around = [(b0[0] + b1[0]) / 2 for b0, b1 in zip(bares, bares[1:])]
    ratios = [lab["rate"] / b for lab, b in zip(labels, around)]
    inline_ratios = [lab["rate"] / b for lab, b in zip(inline, around)]
    cpu_ratio = float(np.mean([b[1] for b in bares])) / float(np.mean([lab["cpu"] for lab in labels]))

    store = labels[-1]["store"]
    rd = LabelStore.open(store.path).read_round(0)
    boxes, _ = sample_crops(cfg.seed, 0, np.arange(len(index)), index.sizes, crops, cfg.crop)
    assert np.array_equal(rd.boxes, boxes), "the labeller cut other crops"
    p = torch.cat(seen)
    kl = kl_to_stored(p, torch.from_numpy(rd.ids.reshape(-1, k).astype(np.int64)),
                      torch.from_numpy(rd.probs.reshape(-1, k + 1)))
    return {"data": str(data), "images": len(index), "crops": n, "classes": len(full.classes),
            "teachers": [f"{t.arch} {t.res}px" for t in loaded], "device": str(dev),
            "labeller": [lab["rate"] for lab in labels], "bare": [b[0] for b in bares], "ratios": ratios,
            "ratio": float(np.median(ratios)), "cpu_ratio": cpu_ratio,
            "inline": [lab["rate"] for lab in inline], "inline_ratios": inline_ratios,
            "inline_ratio": float(np.median(inline_ratios)),
            "write_share": [lab["write_s"] / lab["seconds"] for lab in inline],
            "shards": store.num_shards, "shard_size": shard_size,
            "forward_share": [lab["forward_share"] for lab in labels],
            "cpu_per_crop": (float(np.mean([lab["cpu"] for lab in labels])), float(np.mean([b[1] for b in bares]))),
            "bytes_per_crop": store.data_bytes() / n, "kl_max": float(kl.max()), "kl_mean": float(kl.mean()),
            "top1_median": float(p.max(1).values.median())}


def _filesystem(path: Path) -> str:
    """Type of the file system holding ``path`` (from /proc/mounts), where known."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    best = max((m for m in mounts if str(path.resolve()).startswith(m[0])), key=lambda m: len(m[0]), default=None)
    return best[1] if best else "unknown"


# ---- command -----------------------------------------------------------------------------------

@click.command("label")
@click.argument("data", required=False, type=LocalPath(exists=True, path_type=Path))
@click.option("--teachers", "-t", multiple=True,
              help=f"Teacher specs as for `mealv2 label`; default random-init {' + '.join(DEFAULT_TEACHERS)} at --res.")
@click.option("--res", type=POSITIVE, default=224, show_default=True, help="Resolution of the default teachers.")
@click.option("--crops-per-image", "crops", type=POSITIVE, default=4, show_default=True)
@click.option("--topk", type=POSITIVE, default=5, show_default=True)
@click.option("--images", type=POSITIVE, default=24, show_default=True,
              help="Images the labeller and the bare forward go through (a seeded subset of DATA).")
@click.option("--classes", type=POSITIVE, default=10, show_default=True,
              help="Classes of the generated dataset when DATA is omitted.")
@click.option("--batch-size", type=POSITIVE, default=32, show_default=True, help="Crops per teacher forward.")
@click.option("--workers", type=POSITIVE, default=2, show_default=True, help="DALI threads.")
@click.option("--repeats", type=POSITIVE, default=2, show_default=True,
              help="Labeller passes, each between two bare-forward passes.")
@click.option("--imagenet-images", type=click.IntRange(min=0), default=8192, show_default=True,
              help="Images of the synthetic 1000-class case (0 skips it).")
@click.option("--shard-size", type=POSITIVE, default=1024, show_default=True,
              help="Images per shard of the labeller's store (`mealv2 label`'s default): shards written per pass.")
@device_option
def bench_label(data, teachers, res, crops, topk, images, classes, batch_size, workers, repeats, imagenet_images,
                shard_size, device):
    """Stage-1 crops/s against the bare teacher forward; bytes/crop and KL against FKD's encoding."""
    folder = Path(tempfile.mkdtemp(prefix="mealv2-bench-label-"))
    try:
        real = labeller_case(data, list(teachers), folder, res, crops, topk, images, batch_size, device,
                             workers, classes, repeats, shard_size)
        synth = imagenet_like_case(folder, imagenet_images, crops, topk) if imagenet_images else None
        fkd_file = fkd_file_bytes_per_crop(crops, topk)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    fkd16, fkd32 = fkd_bytes_per_crop(topk), fkd_bytes_per_crop(topk, fp16_coords=False)
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    lines = [
        f"`mealv2 bench label` on {machine_description(real['device'])}; device {real['device']}",
        "",
        f"Labeller: {real['images']} images x {crops} crops = {real['crops']} crops of "
        f"{'a generated ImageNet-sized JPEG dataset' if data is None else real['data']} ({real['classes']} classes); "
        f"teachers {', '.join(real['teachers'])}; {batch_size} crops per forward; k={topk}; {workers} DALI threads; "
        f"median top-1 probability of the ensemble {real['top1_median']:.3f}.",
        "",
        "| measure | value | reference | target | met |",
        "|---|---|---|---|---|",
        f"| stage-1 labeller crops/s (sampling + DALI decode/crop + teachers + top-k + store writes on the "
        f"background writer) | "
        f"{fmt(real['labeller'])} | bare ensemble forward on the same crops, passes around them: "
        f"{fmt(real['bare'])} | ratio >= 0.9 | {fmt(real['ratios'])}: median {real['ratio']:.2f} {met(real['ratio'] >= 0.9)} |",
        f"| the same labeller writing each shard in its loop (no background writer; {real['shards']} shard(s) of "
        f"{real['shard_size']} images per pass), crops/s | {fmt(real['inline'])} | writes took "
        f"{fmt(100 * x for x in real['write_share'])} % of its time | ratio to bare >= 0.9 | "
        f"{fmt(real['inline_ratios'])}: median {real['inline_ratio']:.2f} |",
        f"| share of the labeller's wall time spent in the teacher forward (the rest: waiting for crops, top-k, "
        f"writes) | {fmt(real['forward_share'])} | | >= 0.9 | {met(min(real['forward_share']) >= 0.9)} |",
        f"| CPU seconds per crop, all threads | labeller {real['cpu_per_crop'][0]:.3f} | bare forward "
        f"{real['cpu_per_crop'][1]:.3f} | ratio >= 0.9 | {real['cpu_ratio']:.2f} {met(real['cpu_ratio'] >= 0.9)} |",
        f"| bytes/crop, this run's store ({real['classes']} classes, k={topk}) | {real['bytes_per_crop']:.2f} B | "
        f"FKD: {fkd16} B | <= {fkd16 / 2:g} B | {met(real['bytes_per_crop'] <= fkd16 / 2)} |",
        f"| max KL(fp32 top-k target \\|\\| rebuilt), this run ({real['crops']} crops) | {real['kl_max']:.2e} "
        f"(mean {real['kl_mean']:.1e}) | | <= 1e-3 | {met(real['kl_max'] <= 1e-3)} |",
    ]
    if synth:
        arrays = ", ".join(f"{k} {v:.2f}" for k, v in synth["per_array"].items())
        lines += [
            f"| bytes/crop, ImageNet-like synthetic (1000 classes, k={topk}, {synth['crops']} crops) | "
            f"{synth['bytes_per_crop']:.2f} B ({arrays}) | FKD: {fkd16} B | <= {fkd16 / 2:g} B | "
            f"{met(synth['bytes_per_crop'] <= fkd16 / 2)} |",
            f"| max KL, ImageNet-like synthetic | {synth['kl_max']:.2e} (mean {synth['kl_mean']:.1e}) | | <= 1e-3 | "
            f"{met(synth['kl_max'] <= 1e-3)} |",
        ]
        synced, plain = synth["shard_write_s"]
        extra, cps = max(synced - plain, 0.0), synth["crops_per_shard"]
        labeller_shard_s = cps / float(np.median(real["labeller"]))
        lines.append(
            f"| durability: fsync of a shard's chunk files and folders before its done mark (ImageNet-like shards of "
            f"{cps} crops; median write of a shard) | {synced * 1e3:.1f} ms with fsync, {plain * 1e3:.1f} ms without: "
            f"+{extra * 1e3:.1f} ms per shard | this run's labeller: {labeller_shard_s:.2f} s per shard "
            f"| <= 2 % | {extra / labeller_shard_s:.2%} {met(extra <= 0.02 * labeller_shard_s)} |")
    lines += [
        "",
        f"FKD per crop at k={topk}: fp16 coordinates 8 B + bool flip 1 B + {topk} fp16 ids + {topk} fp16 values "
        f"{4 * topk} B = {fkd16} B (`--use_fp16`); with fp32 coordinates {fkd32} B. Its per-image file as "
        f"written (`torch.save`, {crops} crops) measures {fkd_file:.0f} B per crop: container overhead not counted above.",
        "mealv2 bytes/crop: compressed chunk files of boxes, flips, ids and probs (CRC32C included) over the crops; "
        "zarr.json metadata, `done` marks and `labels` not counted.",
    ]
    if synth:
        lines.append(f"ImageNet-like synthetic: median top-1 probability {synth['top1_median']:.2f}, "
                     f"{synth['crops_sharing_top1']:.0%} of an image's crops share its first crop's top-1 class, "
                     f"boxes from the real sampler on 250-500 px sides, shards of 1024 images.")
        if extra > 0:
            lines.append(f"fsync keeps within 2 % of the labeller's time up to {0.02 * cps / extra:,.0f} crops/s "
                         f"(+{extra * 1e3:.1f} ms per shard of {cps} crops; the store's file system: "
                         f"{_filesystem(folder)}).")
    click.echo("\n".join(lines))
