"""What `inspect` and `verify` say about a store."""
from __future__ import annotations

import numpy as np

from ..common.data.loaders.registry import available_cores
from ..common.store.label_store import LabelStore, StoreError
from ..common.store.locks import held_by, lock_path_beside
from ..common.store.objects import is_url
from ..common.store.schema import layer_arrays

# torch, timm and DALI are imported only by `verify --recompute`: inspect and verify stay quick.

HISTOGRAM_CLASSES = 10   # classes `inspect` lists for an unlabelled store


def store_summary(path) -> dict:
    store = LabelStore.open(path)
    a = store.attrs
    rounds = store.rounds_complete()
    crops = rounds * store.num_images * a["crops_per_image"]
    data_bytes = store.data_bytes()
    summary = {
        "store": str(store.path),
        "complete": store.complete,
        "rounds_complete": rounds,
        "rounds_labelled": store.rounds_labelled(),
        "rounds_planned": store.rounds_planned,
        "num_images": store.num_images,
        "crops_per_image": a["crops_per_image"],
        "crops": crops,
        "topk": a["topk"],
        "temperature": a["temperature"],
        "num_classes": len(a["classes"]),
        "seed": a["seed"],
        "crop": a["crop"],
        "teachers": a["teachers"],
        "layers": layer_summary(store),
        "teacher_precision": a["teacher_precision"],
        "teacher_check": a.get("teacher_check"),
        "dataset_fingerprint": a["dataset"]["fingerprint"],
        "skipped_images": len(a["dataset"]["skipped"]),
        "bytes_on_disk": store.bytes_on_disk(),
        "bytes_per_crop": round(data_bytes / crops, 2) if crops and data_bytes is not None else None,
        "bytes_per_crop_by_layer": layer_bytes_per_crop(store, crops),
        "top1_agreement": None,
        "top1_histogram": None,
        "runs": store.runs(),
    }
    if rounds:
        # Agreement of the ensemble's top-1 with the dataset labels, over round 0's crops; each
        # teacher's own agreement is the teacher check's (on a sample, before labelling). Without
        # labels (all -1), the share of round 0's crops whose top-1 is each class, top ones first.
        top1, labels = _read_checked(store, lambda: (store.read_round(0).ids[..., 0], store.labels()))
        if (labels >= 0).any():
            summary["top1_agreement"] = round(float((top1 == labels[:, None]).mean()), 4)
        else:
            summary["top1_histogram"] = top1_histogram(top1, a["classes"])
    return summary


def layer_summary(store: LabelStore) -> list[dict]:
    """The per-teacher layers, by their position in ``train --teacher-weights`` (1, 2, ...): each one's teacher,
    how it came (with the ensemble, ``--keep-teachers``; or later, ``--add-teacher``, with its own teacher check),
    and whether it is finished (an added layer is until its command has labelled every round)."""
    finished = set(store.readable_layers())
    return [{"position": j + 1, "teacher": layer["teacher"], "added_by": "--add-teacher" if j in store.added_layers()
             else "--keep-teachers", "finished": j in finished, "teacher_check": layer.get("teacher_check")}
            for j, layer in enumerate(store.layers)]


def layer_bytes_per_crop(store: LabelStore, crops: int) -> dict[str, float | None] | None:
    """Bytes per crop of each layer's ids and codes, and of the crops (boxes, flips) they share: the ensemble's,
    then each per-teacher layer's, by the teacher's spec (``label --keep-teachers``). None before a crop is stored."""
    if not crops:
        return None

    def per_crop(names) -> float | None:
        sizes = [store.array_bytes(name) for name in names]
        return None if None in sizes else round(sum(sizes) / crops, 2)
    layers = {"crops (boxes, flips)": per_crop(("boxes", "flips")), "ensemble": per_crop(("ids", "probs"))}
    for j, layer in enumerate(store.layers):
        layers[f"teacher {j + 1}: {layer['teacher']['spec']}"] = per_crop(layer_arrays(j))
    return layers


def _read_checked(store: LabelStore, read):
    """``read()``, or a refusal naming the damaged objects (from a verify of the store, run only when a
    read fails: inspect reads little and stays quick) and what repairs them, in place of zarr's traceback."""
    try:
        return read()
    except StoreError:
        raise
    except Exception as e:   # zarr reports a checksum mismatch or a bad codec stream this way
        problems, fix = store_problems(store.path)
        found = "\n  ".join(problems[:5]) if problems else f"{type(e).__name__}: {e}"
        raise StoreError(f"{store.path} is damaged and cannot be read:\n  {found}\n`mealv2 verify {store.path}` "
                         f"lists every problem; "
                         + (fix or "re-running the `mealv2 label` command that made the store repairs it")) from e


def top1_histogram(top1: np.ndarray, classes: list[str], top: int = HISTOGRAM_CLASSES) -> dict[str, float]:
    """{class name: share of crops whose top-1 it is} for the ``top`` most predicted classes."""
    counts = np.bincount(top1.ravel().astype(np.int64), minlength=len(classes))
    order = np.argsort(-counts, kind="stable")[:top]
    return {classes[c]: round(float(counts[c] / counts.sum()), 4) for c in order if counts[c]}


def run_lines(runs: list[dict]) -> list[str]:
    """One line per labelling run a store recorded: what it took."""
    if not runs:
        return ["none recorded: no labelling run has finished (a run is recorded when it ends), or the store was "
                "made before mealv2 recorded its runs"]
    return [f"{r['finished']}: {r['crops']:,} crops in {r['label_s']:.1f} s ({r['crops_per_s']:.1f} crops/s) on "
            f"{r['device']}" + (f" x {r['ranks']} ranks" if r["ranks"] > 1 else "")
            + f", loader {r['loader']}, batch {r['batch_size']}; the whole command {r['wall_s']:.1f} s" for r in runs]


def dataset_mismatch(store: LabelStore, data, index) -> str | None:
    """What differs between DATA's ``index`` and the dataset ``store`` was labelled from; None if nothing."""
    if index.fingerprint == store.attrs["dataset"]["fingerprint"]:
        return None
    return (f"--data {data}: dataset fingerprint {index.fingerprint[:16]} differs from the store's "
            f"{store.attrs['dataset']['fingerprint'][:16]}; {store.dataset_changes(index.relpaths)}")


def store_problems(path) -> tuple[list[str], str | None]:
    """Problems of the store itself (checksums, completion, missing chunks) and what repairs them:
    the `mealv2 label` command that made it, which labels exactly those shards again."""
    try:
        store = LabelStore.open(path)
    except StoreError as e:
        return [str(e)], None
    if not is_url(store.path) and (holder := held_by(lock_path_beside(store.path))):
        return [f"{store.path} is being written by a `mealv2 label` process now ({holder}): what it has not "
                f"finished would read as damage; verify it once that command has ended"], None
    problems = store.verify()
    if not problems:
        return [], None
    return problems, (f"repair: re-run the `mealv2 label` command that made {store.path} (and, for an added "
                      f"layer, its `--add-teacher` command); it labels again exactly the shards named above (DATA "
                      f"is the dataset it was made from; --batch-size, --workers and --device may differ):\n  "
                      + "\n  ".join(store.repair_commands(problems)))


def verify_store(path, data=None, recompute: int | None = None, tolerance: float = 0.02,
                 device: str = "auto") -> list[str]:
    """Problems found in the store (:func:`store_problems`); with ``data``, DATA against the store: its
    fingerprint (paths, classes, labels, sizes) and every image's CRC32C, loading no teacher; with
    ``recompute`` too, the teachers re-run on that many random stored crops.

    Only ``recompute`` loads teachers: they are loaded by the specs the store records (its maker's local
    checkpoint paths, timm names), so checking a store from elsewhere against DATA must not read files or
    fetch models it names. Checkpoint files are read as data unless ``--trust-checkpoint`` is in force."""
    if recompute is not None and data is None:
        raise StoreError(f"verify {path}: --recompute {recompute} re-runs the teachers on stored crops of DATA; "
                         f"add --data DATA (the dataset the store was labelled from)")
    problems, _ = store_problems(path)
    if data is None or problems:
        return problems
    store = LabelStore.open(path)
    from ..common.data.dataset import BadImagesError, build_index, image_crcs

    try:   # a store labelled with --skip-bad records the images it left out: the same are left out here
        index = build_index(data, skip_bad=bool(store.attrs["dataset"]["skipped"]))
    except BadImagesError as e:
        return [f"--data {data}: {len(e.bad)} image(s) cannot be read, which the store was labelled from: "
                + "; ".join(f"{rel} ({reason})" for rel, reason in e.bad[:5]) + ("; ..." if len(e.bad) > 5 else "")
                + "; restore them from the dataset's source"]
    fix = f"Restore the images {store.path} was labelled from, or pass --data the dataset it was labelled from"
    if mismatch := dataset_mismatch(store, data, index):
        if store.relpaths() == list(index.relpaths):   # the same paths: the stored CRC32Cs name the files changed
            crcs = image_crcs(index)
            changed = np.flatnonzero(store.crcs() != crcs)
            if len(changed):
                mismatch += f"\n  {store.images_changed(changed, crcs[changed], index.relpaths, fix)}"
        return [mismatch]
    crcs = image_crcs(index)
    changed = store.changed_images(crcs)
    if len(changed):   # what `train` refuses as it reads them
        return [str(store.images_changed(changed, crcs[changed], index.relpaths, fix))]
    return [] if recompute is None else _teacher_problems(store, index, recompute, tolerance, device)


def _teacher_problems(store: LabelStore, index, recompute: int, tolerance: float, device: str) -> list[str]:
    """The store's teachers as recorded (their spec, the --res and the class names they were labelled with,
    mapped onto the store's classes: the dataset's, which the fingerprint covers, or the teachers'), checked
    against their record, then re-run on ``recompute`` stored crops."""
    from ..common.models.runtime import Runtime
    from ..common.models.teachers import load_teacher

    a = store.attrs
    teachers = [load_teacher(t["spec"], a["classes"], t["res"], stated_classes=t["output_classes"])
                for t in a["teachers"]]
    problems = []
    for t, recorded in zip(teachers, a["teachers"]):
        for key in ("sha256", "res", "mean", "std"):
            ours = list(getattr(t, key)) if key in ("mean", "std") else getattr(t, key)
            if ours != recorded[key]:
                problems.append(f"teacher {t.spec}: {key} {ours} differs from the store's {recorded[key]}")
    if problems:
        return problems
    return _recompute(store, index, teachers, recompute, tolerance, Runtime.create(device, a["teacher_precision"]))


def _recompute(store: LabelStore, index, teachers, n: int, tolerance: float, runtime) -> list[str]:
    """Re-run the teachers on the stored crops of ``n`` random images of a random round."""
    import torch

    from ..common.data.loaders.base import CropRequest
    from ..common.data.loaders.registry import describe, iterate, resolve
    from ..common.data.targets import decode_probs
    from ..common.models.teachers import Ensemble

    a = store.attrs
    c = a["crops_per_image"]
    ensemble = Ensemble(teachers, runtime, a["temperature"])
    rng = np.random.default_rng()
    r = int(rng.integers(store.rounds_complete()))
    data = store.read_round(r)
    ids = np.sort(rng.choice(store.num_images, size=min(n, store.num_images), replace=False))
    loader, threads = resolve("auto", runtime.device.type), available_cores()
    print(describe(loader, runtime.device.type, threads))
    (batch,) = iterate(loader, index, [CropRequest(ids, data.boxes[ids], data.flips[ids].astype(bool))],
                       ensemble.views, c, batch_size=len(ids), device=runtime.device.type, threads=threads)
    probs = ensemble.probs(batch.views).cpu()
    stored_ids = torch.from_numpy(data.ids[ids].astype(np.int64)).reshape(len(ids) * c, -1)
    stored = decode_probs(torch.from_numpy(data.probs[ids][..., :stored_ids.shape[1]])).reshape(stored_ids.shape)
    deviation = (probs.gather(1, stored_ids) - stored).abs().max(dim=1).values
    worst, at = float(deviation.max()), int(deviation.argmax())
    image, crop = int(ids[at // c]), at % c
    print(f"recomputed {len(ids) * c} crops of round {r}: largest |stored - recomputed| probability "
          f"{worst:.4f} (image {image} crop {crop})")
    if worst > tolerance:
        return [f"round {r} image {image} ({index.relpaths[image]}) crop {crop}: stored probabilities "
                f"deviate by {worst:.4f} from the teachers' (tolerance {tolerance})"]
    return []
