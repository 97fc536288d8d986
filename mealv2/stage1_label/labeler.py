"""Stage 1: run the ensemble once over R rounds x C random crops per image, store top-k labels.

Work is split into (round, shard) units. Each unit's crops are a pure function of the
seed, so units can be done in any order, by any rank, after any interruption, and the
store comes out the same. A rank takes the shards ``s % world_size == rank``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from .. import __version__
from ..common.config import config_args
from ..common.data.crops import sample_crops
from ..common.data.dataset import build_index_shared, image_crcs, in_classes, refuse_nested, skipped_report
from ..common.data.loaders.base import CropRequest
from ..common.data.loaders.registry import describe, iterate, resolve
from ..common.data.targets import encode_topk
from ..common.errors import MealV2Error
from ..common.models.distributed import distributed
from ..common.models.runtime import Runtime
from ..common.models.teacher_check import check_teachers
from ..common.models.teachers import (Ensemble, load_teachers, naming_extra_classes, read_classes_file,
                                      read_teacher_classes, teacher_table)
from ..common.store.faults import fault_point
from ..common.store.label_store import (DATA_ARRAYS, ROUND_ARRAYS, LabelStore, acquire_writer_lock, num_shards,
                                       watch_writer_lock, writer_lock_share)
from ..common.store.lease import lease_seconds
from ..common.store.objects import is_url, open_objects
from ..common.store.writer import ShardWriter
from .config import LabelConfig
from .cost import LabelCost


# The ranges the flags take (min, max or None, min excluded), which LabelConfig applies in Python too.
def store_attrs(cfg: LabelConfig, index, teachers, classes=None) -> dict:
    """Everything that identifies a store's labels (see common/store/schema.py); ``classes`` are the
    label space's (default the dataset's; the teachers' for unlabelled data or fewer dataset classes)."""
    return {
        "classes": list(index.classes if classes is None else classes),
        "topk": cfg.topk,
        "temperature": cfg.temperature,
        "seed": cfg.seed,
        "crops_per_image": cfg.crops_per_image,
        "shard_size": cfg.shard_size,
        "crop": cfg.crop.to_attrs(),
        "teachers": [t.to_attrs() for t in teachers],
        "teacher_precision": cfg.teacher_precision,
        "dataset": {"num_images": len(index), "fingerprint": index.fingerprint,
                    "skipped": [list(s) for s in index.skipped]},
        "mealv2_version": __version__,
    }


def _requests(work: list[tuple[int, int, int, int]], crops, images_per_batch: int, plan: deque) -> Iterator[CropRequest]:
    """Crop requests for each (round, shard, first image, end), in batches that never span two shards;
    ``crops(round, ids)``: the images' boxes and flips."""
    for r, s, a, b in work:
        for start in range(a, b, images_per_batch):
            ids = np.arange(start, min(start + images_per_batch, b))
            boxes, flips = crops(r, ids)
            plan.append((r, s, boxes, flips))
            yield CropRequest(ids, boxes, flips)


def _labelled(cfg: LabelConfig, index, ensemble: Ensemble, work: list[tuple[int, int, int, int]],
              loader: str, crops=None) -> Iterator[tuple]:
    """(round, shard, boxes, flips, ids, codes, crcs, layers) of each batch of ``work``, per image: crops sampled
    (or ``crops(round, ids)``'s: a store's, for ``--add-teacher``), rendered by the loader, through the ensemble
    and the top-k code; ``layers`` each teacher's own (ids, codes) with ``--keep-teachers``, else none. What a
    run writes and a dry run times."""
    images_per_batch = max(1, cfg.batch_size // cfg.crops_per_image)
    plan: deque = deque()
    crops = crops or (lambda r, ids: sample_crops(cfg.seed, r, ids, index.sizes[ids], cfg.crops_per_image, cfg.crop))
    batches = iterate(loader, index, _requests(work, crops, images_per_batch, plan),
                      ensemble.views, cfg.crops_per_image, batch_size=images_per_batch,
                      device=ensemble.device.type, threads=cfg.workers)
    for batch in batches:
        fault_point("decode")      # a batch decoded, not yet labelled
        r, s, boxes, flips = plan.popleft()
        probs, layers = ensemble.probs_and_layers(batch.views) if cfg.keep_teachers else (ensemble.probs(batch.views), [])
        if not all(bool(p.isfinite().all()) for p in (probs, *layers)):   # encoded, nan and inf would be stored as some top-k
            raise MealV2Error(f"the teachers' probabilities for round {r}, shard {s} (images {batch.ids[0]}-"
                              f"{batch.ids[-1]}) are not finite (nan or inf): a teacher's weights hold nan or "
                              f"inf, or --teacher-precision {cfg.teacher_precision} overflows; the shard was not "
                              f"written")
        shape = (len(batch.ids), cfg.crops_per_image, -1)
        (ids, codes), *kept = [tuple(x.reshape(shape).cpu().numpy() for x in encode_topk(p, cfg.topk))
                               for p in (probs, *layers)]
        yield r, s, boxes, flips, ids, codes, batch.crcs, kept


def join_layers(batches: list[list[tuple]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer its (ids, codes) over ``batches`` (each batch's list of per-layer (ids, codes)), joined in order."""
    return [tuple(np.concatenate(x) for x in zip(*per_batch)) for per_batch in zip(*batches)]


MAX_CHUNK_BYTES = 2**30   # a shard's chunk is held in RAM while labelled, and blosc takes at most 2 GiB


def check_shard_size(cfg: LabelConfig) -> None:
    """Refuse a --shard-size whose chunks (one per array and shard) could not be held and compressed."""
    per_image = cfg.crops_per_image * max(8, 4 * cfg.topk, cfg.topk + 1)   # boxes; ids (int32 at most); probs
    most = MAX_CHUNK_BYTES // per_image
    if cfg.shard_size > most:
        raise MealV2Error(f"--shard-size {cfg.shard_size}: a shard's largest chunk would take "
                          f"{cfg.shard_size * per_image / 2**30:.1f} GiB ({per_image} bytes per image at "
                          f"--crops-per-image {cfg.crops_per_image}, --topk {cfg.topk}), more than the 1 GiB a "
                          f"chunk may; use at most {most} (default 1024)")


def run_label(cfg: LabelConfig) -> LabelStore | LabelCost:
    """Label ``cfg.rounds`` rounds into ``cfg.out`` (created, resumed or appended to), as ``mealv2 label``
    does (which only builds ``cfg``); with ``cfg.dry_run``, only measure what that would take.

    Args:
        cfg: what to label and how; its fields are the CLI's flags.

    Returns:
        The store (``store.path``, ``store.attrs``: classes, teachers, crops, temperature, ...; ``store.runs()``:
        what each labelling command took); with ``cfg.dry_run`` the :class:`LabelCost` it printed.

    Example::

        store = mealv2.label(mealv2.LabelConfig("data/train", ["resnet50.a1_in1k"], "store.zarr", rounds=4))
    """
    if not is_url(cfg.out):
        refuse_nested(cfg.data, cfg.out, "--out")
    if cfg.add_teacher:
        from .add_teacher import run_add_teacher   # it imports this module's labelling loop

        return run_add_teacher(cfg)
    check_shard_size(cfg)
    started = time.perf_counter()
    with distributed(cfg.device) as (info, device):
        say = print if info.is_main else (lambda *a, **k: None)
        index = build_index_shared(cfg.data, info, skip_bad=cfg.skip_bad, workers=max(cfg.workers, 8),
                                   progress=cfg.progress and info.is_main)
        if skipped := skipped_report(index):
            say(skipped)
        names = read_classes_file(cfg.classes_file) if cfg.classes_file else None
        stated = read_teacher_classes(cfg.teacher_classes, len(cfg.teachers))
        with naming_extra_classes(cfg.data, index, names):
            teachers, classes, note = load_teachers(cfg.teachers, index.classes, cfg.crop.res, names,
                                                    stated_classes=stated)
        if cfg.topk > len(classes):
            whose = "dataset's" if note is None else "teachers'"
            raise MealV2Error(f"--topk {cfg.topk} is larger than the {whose} {len(classes)} classes")
        say(teacher_table(teachers, cfg.crop.res, "dataset" if note is None else "label space"))
        if note:
            say(note)
        # The dataset's labels in the label space: the teacher check's and the store's `labels` (-1: none).
        in_space = in_classes(index, classes) if index.labelled else index
        ensemble = Ensemble(teachers, Runtime(device, cfg.teacher_precision), cfg.temperature)
        if cfg.dry_run:   # before the teacher check, the store and its lock or lease: nothing is written
            cost = dry_run(cfg, index, ensemble, store_attrs(cfg, index, teachers, classes), in_space.labels,
                           info.world_size) if info.is_main else None
            return info.broadcast_object(cost)
        new_store = not open_objects(cfg.out).exists("zarr.json")
        checks = None
        if new_store:   # a store being resumed was checked when it was made
            checks = info.broadcast_object(_check(cfg, ensemble, in_space) if info.is_main else None)
            if isinstance(checks, MealV2Error):
                raise checks
        attrs = store_attrs(cfg, index, teachers, classes)
        if checks is not None:
            attrs["teacher_check"] = checks
        lock = acquire_writer_lock(cfg.out) if info.is_main else None
        watch = None   # rank 0's lease, as the other ranks watch it
        try:  # a refused store releases the lock too (matters when called in-process)
            if info.is_main:   # the lease guards the resume's repair, pack and resize: a lease can be lost
                store = LabelStore.create_or_resume(cfg.out, attrs, cfg.rounds, in_space.labels,
                                                    before_growing=lambda s: _check_unchanged(s, index, cfg),
                                                    relpaths=index.relpaths, guard=getattr(lock, "check", None),
                                                    layers=attrs["teachers"] if cfg.keep_teachers else ())
                store.remove_partial_writes()
                for line in store.repairs:
                    say(f"repair: {line}")
            share = info.broadcast_object(writer_lock_share(lock) if info.is_main else None)   # and a barrier
            if not info.is_main:
                store = LabelStore.open(cfg.out, mode="r+")
                watch = watch_writer_lock(cfg.out, share)
                store.guard = getattr(watch, "check", None)
            labelling = time.perf_counter()
            crops, seconds = label_shards(cfg, store, index, ensemble, info)
            info.barrier()
            labelled = int(info.all_sum([crops])[0])
            if info.is_main:   # every rank's shards are written: one process joins each round into its objects
                store.pack()
                if labelled:   # a command with nothing left to do leaves the store as it was
                    store.record_run(run_record(cfg, labelled, time.perf_counter() - labelling,
                                                time.perf_counter() - started, device, info.world_size))
        finally:
            for held in (watch, lock):
                if held is not None:
                    held.release()
        if info.is_main:
            print(f"mealv2 label: {throughput(crops, seconds, info)}; {store.path}: {store.rounds_complete()}/"
                  f"{store.rounds_planned} rounds complete, {store.bytes_on_disk() / 2**20:.1f} MiB")
        return store


def throughput(crops: int, seconds: float, info) -> str:
    """What this rank labelled and how fast, for the line a labelling command ends with."""
    rate = f"{crops / seconds:.0f} crops/s" if seconds > 0 else "nothing left to do"
    return f"{crops} crops in {seconds:.1f}s ({rate}{f' on rank 0 of {info.world_size}' if info.enabled else ''})"


def run_record(cfg: LabelConfig, crops: int, label_s: float, wall_s: float, device, ranks: int) -> dict:
    """What a labelling command took, as the store records it (``inspect`` shows it): ``label_s`` from its
    first crop to its last round packed, what a dry run predicts; ``wall_s`` the whole command (index,
    teachers, teacher check included)."""
    return {"finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "crops": crops,
            "label_s": round(label_s, 3), "wall_s": round(wall_s, 3), "crops_per_s": round(crops / label_s, 3),
            "ranks": ranks, "device": device_name(device), "loader": resolve(cfg.loader, torch.device(device).type),
            "batch_size": cfg.batch_size, "workers": cfg.workers, "mealv2_version": __version__}


def device_name(device) -> str:
    """Where a rate was measured: cpu, or cuda and the GPU's name."""
    device = torch.device(device)
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


# A dry run times batches after a warm-up one (loader built, first forwards) until it has timed at least
# DRY_RUN_BATCHES[0] batches and DRY_RUN_SECONDS (a rate taken over seconds, not one batch, on a busy machine),
# or DRY_RUN_BATCHES[1] batches, or the dataset's images.
DRY_RUN_BATCHES = (3, 64)
DRY_RUN_SECONDS = 10.0


def dry_run(cfg: LabelConfig, index, ensemble: Ensemble, attrs: dict, labels: np.ndarray, ranks: int) -> LabelCost:
    """What the run of ``cfg`` will take, printed: batches of round 0's crops of the first images through the
    run's own loader, ensemble and top-k code, timed after the first, then written and packed as the store
    does it (:func:`trial_store`, deleted). Nothing is written to ``cfg.out``; a store there is refused first as
    the run would refuse it."""
    rounds, shards, units = _work_todo(cfg, attrs, index.relpaths)
    images_per_batch = max(1, cfg.batch_size // cfg.crops_per_image)
    n = min(len(index), images_per_batch * (1 + DRY_RUN_BATCHES[1]))
    work = [(0, s, a, min(a + cfg.shard_size, n)) for s, a in enumerate(range(0, n, cfg.shard_size))]
    loader = resolve(cfg.loader, ensemble.device.type)
    print(describe(loader, ensemble.device.type, cfg.workers))
    batches, times = [], [time.perf_counter()]
    with contextlib.closing(_labelled(cfg, index, ensemble, work, loader)) as labelled:
        for batch in labelled:
            batches.append(batch)
            times.append(time.perf_counter())
            if len(batches) > DRY_RUN_BATCHES[0] and times[-1] - times[1] >= DRY_RUN_SECONDS:
                break
    timed = batches[1:] or batches   # one batch (a tiny dataset) is timed with its warm-up
    crops = sum(len(b[2]) for b in timed) * cfg.crops_per_image
    rate = crops / (times[-1] - times[-1 - len(timed)])
    warm_up = times[1] - times[0] - len(batches[0][2]) * cfg.crops_per_image / rate   # beyond its crops at the rate
    startup = max(0.0, warm_up) if len(batches) > 1 else 0.0
    trial = trial_store(cfg, attrs, batches, labels, index.relpaths)
    layers = len(ensemble.teachers) if cfg.keep_teachers else 0   # each adds an ids and a probs array
    cost = LabelCost(crops=sum(b - a for a, b in units) * cfg.crops_per_image, units=len(units),
                     store_crops=rounds * len(index) * cfg.crops_per_image, rounds=rounds, shards=shards, ranks=ranks,
                     measured_crops=crops, crops_per_s=rate, startup_s=startup, write_s=trial.write_s,
                     pack_s=trial.pack_s, device=device_name(ensemble.device), bytes_per_crop=trial.bytes_per_crop,
                     objects=trial.objects + (len(ROUND_ARRAYS) + 2 * layers) * (rounds - 1),
                     url=cfg.out if is_url(cfg.out) else None, lease_s=lease_seconds(None, MealV2Error),
                     arrays=len(DATA_ARRAYS) + 2 * layers)
    for line in cost.lines():
        print(line)
    return cost


@dataclasses.dataclass(frozen=True)
class TrialStore:
    """What writing a dry run's crops as the store does it measured."""

    bytes_per_crop: float
    objects: int       # of the one-round store
    write_s: float     # per shard: its chunks written (durable) and marked
    pack_s: float      # per round: its shards joined into objects, committed, the staged files deleted


def trial_store(cfg: LabelConfig, attrs: dict, batches: list[tuple], labels: np.ndarray, relpaths) -> TrialStore:
    """``batches`` (``_labelled``'s, of the first images) written and packed as the run will do it (shards of
    its size, made durable), as a one-round store of those images in a temporary folder beside ``cfg.out``
    (on its disk: fsync costs differ between disks; in the system's temporary folder for a URL), deleted."""
    boxes, flips, ids, codes, crcs = (np.concatenate(x) for x in zip(*(b[2:7] for b in batches)))
    layers = join_layers([b[7] for b in batches])
    m = len(boxes)
    attrs = {**attrs, "dataset": {**attrs["dataset"], "num_images": m}}
    beside = None if is_url(cfg.out) else next(p for p in Path(cfg.out).absolute().parents if p.is_dir())
    with tempfile.TemporaryDirectory(prefix=".mealv2-dry-run-", dir=beside) as tmp:
        store = LabelStore.create_or_resume(Path(tmp) / "store", attrs, 1, labels[:m], relpaths=relpaths[:m],
                                            layers=attrs["teachers"] if cfg.keep_teachers else ())
        started = time.perf_counter()
        for s in range(store.num_shards):
            a, b = store.shard_range(s)
            store.write_shard(0, s, boxes[a:b], flips[a:b], ids[a:b].astype(store.id_dtype), codes[a:b], crcs[a:b],
                              layers=[(i[a:b].astype(store.id_dtype), c[a:b]) for i, c in layers])
        written = time.perf_counter()
        store.pack()
        return TrialStore(store.data_bytes() / boxes[..., 0].size,
                          sum(1 for f in Path(tmp, "store").rglob("*") if f.is_file()),
                          (written - started) / store.num_shards, time.perf_counter() - written)


def _work_todo(cfg: LabelConfig, attrs: dict, relpaths) -> tuple[int, int, list[tuple[int, int]]]:
    """(rounds, shards, the image range of each (round, shard) left to label) for the run of ``cfg`` (its store
    attributes ``attrs``, its images ``relpaths``): every unit of a new store, those without a done mark in a
    store that exists (read, not written), after the refusals the run would give that store."""
    num_images = len(relpaths)
    rounds, shards = cfg.rounds, num_shards(num_images, cfg.shard_size)
    done = np.zeros((rounds, shards), dtype=bool)
    if open_objects(cfg.out).exists("zarr.json"):
        store = LabelStore.open(cfg.out)
        store.check_resumable(attrs, keeps_layers=cfg.keep_teachers, relpaths=relpaths)
        store.check_rounds(rounds)
        marks = store.done_mask()[:rounds]
        done[:len(marks)] = marks
    ranges = [(s * cfg.shard_size, min((s + 1) * cfg.shard_size, num_images)) for s in range(shards)]
    return rounds, shards, [ranges[s] for r, s in zip(*np.nonzero(~done))]


def _check_unchanged(store: LabelStore, index, cfg: LabelConfig) -> None:
    """Before appending rounds: refuse images changed since the store's rounds were labelled. Found
    only when a shard is labelled again, the store would already plan the new rounds, and `train`
    refuse it as incomplete, for one more read of the images' bytes."""
    crcs = image_crcs(index, workers=max(cfg.workers, 8), progress=cfg.progress)
    changed = store.changed_images(crcs)
    if len(changed):
        raise store.images_changed(changed, crcs[changed], index.relpaths)


def _check(cfg: LabelConfig, ensemble: Ensemble, index) -> list[dict] | MealV2Error:
    """The teacher check's records, or the error to raise on every rank."""
    if not cfg.teacher_check:
        print("teacher check: skipped (--no-teacher-check)")
        return [{"teacher": t.spec, "skipped": True} for t in ensemble.teachers]
    if not index.labelled:
        print("teacher check: not run: DATA has no labels to check the teachers' inputs against")
        return [{"teacher": t.spec, "skipped": True, "why": "no labels"} for t in ensemble.teachers]
    try:
        checks = check_teachers(ensemble, index, cfg.crop, cfg.crops_per_image, cfg.seed, cfg.batch_size,
                                cfg.workers, loader=cfg.loader,
                                suggest_dir=Path.cwd() if is_url(cfg.out) else Path(cfg.out).parent,
                                argv=["label", *config_args(cfg)])
    except MealV2Error as e:
        return e
    for c in checks:
        print(f"teacher check: {c.line()}")
    return [dataclasses.asdict(c) for c in checks]


def label_shards(cfg: LabelConfig, store: LabelStore, index, ensemble: Ensemble, info, crops=None) -> tuple[int, float]:
    """Label this rank's incomplete shards of ``store`` (or of an added layer: common/store/added_layer.py,
    with its ``crops``); returns (crops labelled, seconds)."""
    done = store.done_mask()
    work = [(r, s, *store.shard_range(s)) for r in range(store.rounds_planned) for s in range(store.num_shards)
            if not done[r, s] and s % info.world_size == info.rank]
    crops_todo = sum(b - a for _, _, a, b in work) * cfg.crops_per_image
    if not work:
        return 0, 0.0
    loader = resolve(cfg.loader, ensemble.device.type)
    if info.is_main:
        print(describe(loader, ensemble.device.type, cfg.workers))
    bar = tqdm(total=int(crops_todo), unit="crop", unit_scale=True, dynamic_ncols=True,
               disable=not cfg.progress or not info.is_main, desc=f"label {store.name}")
    pending: dict[tuple[int, int], list] = {}
    started = time.perf_counter()
    with ShardWriter(store, cfg.write_depth, names=index.relpaths) as writer:   # exit waits for the last writes
        for r, s, boxes, flips, ids, codes, crcs, layers in _labelled(cfg, index, ensemble, work, loader, crops):
            part = pending.setdefault((r, s), [])
            part.append((boxes, flips, ids.astype(store.id_dtype), codes, crcs,
                         [(i.astype(store.id_dtype), c) for i, c in layers]))
            a, b = store.shard_range(s)
            if sum(len(p[0]) for p in part) == b - a:
                part = pending.pop((r, s))
                writer.submit(r, s, *(np.concatenate(x) for x in zip(*(p[:5] for p in part))),
                              layers=join_layers([p[5] for p in part]))
            bar.update(boxes.shape[0] * cfg.crops_per_image)
    bar.close()
    return crops_todo, time.perf_counter() - started
