"""What `inspect` and `verify` say about a store."""
from __future__ import annotations

import numpy as np

from ..common.store import LabelStore, StoreError

# torch, timm and DALI are imported only by `verify --data`: inspect and verify stay quick.


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
        "dataset_fingerprint": a["dataset"]["fingerprint"],
        "skipped_images": len(a["dataset"]["skipped"]),
        "bytes_on_disk": store.bytes_on_disk(),
        "bytes_per_crop": round(data_bytes / crops, 2) if crops else None,
        "top1_agreement": None,
    }
    if rounds:
        # Agreement of the ensemble's top-1 with the dataset labels, over round 0's crops.
        top1 = store.read_round(0).ids[..., 0]
        summary["top1_agreement"] = round(float((top1 == store.labels()[:, None]).mean()), 4)
    return summary


def verify_store(path, data=None, recompute: int = 16, tolerance: float = 0.02, device: str = "auto") -> list[str]:
    """Problems found in the store (checksums, completion, missing chunks), and with ``data``
    the teachers re-run on ``recompute`` random stored crops."""
    try:
        store = LabelStore.open(path)
    except StoreError as e:
        return [str(e)]
    problems = store.verify()
    if data is None or problems:
        return problems
    from ..common.dataset import build_index
    from ..common.distributed import DistInfo, resolve_device
    from ..common.models import load_teacher

    index = build_index(data)
    a = store.attrs
    if index.fingerprint != a["dataset"]["fingerprint"]:
        return problems + [f"--data {data}: dataset fingerprint {index.fingerprint[:16]} differs from the "
                           f"store's {a['dataset']['fingerprint'][:16]}"]
    teachers = [load_teacher(t["spec"], index.classes) for t in a["teachers"]]
    for t, recorded in zip(teachers, a["teachers"]):
        if t.sha256 != recorded["sha256"]:
            problems.append(f"teacher {t.spec}: weights SHA-256 {t.sha256[:16]} differ from the store's "
                            f"{recorded['sha256'][:16]}")
    if problems:
        return problems
    return _recompute(store, index, teachers, recompute, tolerance, resolve_device(device, DistInfo()))


def _recompute(store: LabelStore, index, teachers, n: int, tolerance: float, device) -> list[str]:
    """Re-run the teachers on the stored crops of ``n`` random images of a random round."""
    import torch

    from ..common.crop_loader import CropRequest, iterate_crops
    from ..common.targets import decode_probs
    from .ensemble import Ensemble

    a = store.attrs
    c = a["crops_per_image"]
    ensemble = Ensemble(teachers, device, a["temperature"])
    rng = np.random.default_rng()
    r = int(rng.integers(store.rounds_complete()))
    data = store.read_round(r)
    ids = np.sort(rng.choice(store.num_images, size=min(n, store.num_images), replace=False))
    (batch,) = iterate_crops(index, [CropRequest(ids, data.boxes[ids], data.flips[ids].astype(bool))],
                             ensemble.views, c, len(ids), device=device.type)
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
