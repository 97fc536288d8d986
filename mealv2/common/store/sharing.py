"""A store made to be shared (`mealv2 publish`): a copy of a finished, sound store without what only its
maker's machine knows, the folders of the teachers' checkpoint files.

What stays is what the labels are and how a store is matched to DATA: the images' relative paths (the
``paths`` array, and the dataset fingerprint over them), the class names, each teacher's architecture,
timm name, SHA-256, input and weight, and the labelling runs (``mealv2_runs``: times, crop counts, GPU
names, ranks, loader; no host, user or path). The copy's chunks are the original's bytes, so it trains
exactly as the original does, and it answers to the original's digest (schema.identity_digest): a run
trained from one resumes from the other.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass

import zarr

from .files import PARTIAL
from .label_store import LabelStore
from .objects import open_objects
from .schema import ATTR_KEY, DIGEST_KEY, PUBLISHED_KEY, STAGED, StoreError, json_digest

# A '/' inside an explicit %MEAN/STD suffix ('%0.5:0.5:0.5/0.2:0.2:0.2') separates no folders.
_IN_NORM = re.compile(r"%[0-9.:eE+-]+$")


def shared_spec(spec: str, arch: str) -> str:
    """Teacher ``spec`` with its checkpoint's folders dropped, its file name and suffixes kept:
    ``resnet50=/home/me/ckpt/r50.pth@224`` -> ``resnet50=r50.pth@224``, ``/runs/t/best.pt*2`` -> ``best.pt*2``.
    A timm name (``arch``, the recorded architecture, with suffixes) names no file and stays."""
    if "=" in spec:
        named, path = spec.split("=", 1)
        return f"{named}={_file_name(path)}"
    if spec == arch or (spec.startswith(arch) and spec[len(arch)] in "@*%"):
        return spec
    return _file_name(spec)


def _file_name(path: str) -> str:
    """``path`` (with a spec's suffixes) from its file name on."""
    cut = max((i for i, c in enumerate(path) if c == "/" and not _IN_NORM.search(path[:i])), default=-1)
    return path[cut + 1:]


def shared_attrs(attrs: dict, digest: str) -> dict:
    """The attributes of a published copy of a store with ``attrs`` and identity ``digest``: teachers'
    specs (and the teacher check's names of them) by :func:`shared_spec`, and the original's digest."""
    specs = {t["spec"]: shared_spec(t["spec"], t["arch"]) for t in attrs["teachers"]}
    shared = {k: v for k, v in attrs.items() if k != PUBLISHED_KEY}
    shared["teachers"] = [{**t, "spec": specs[t["spec"]]} for t in attrs["teachers"]]
    if shared.get("teacher_check"):
        shared["teacher_check"] = [{**c, "teacher": specs.get(c["teacher"], c["teacher"])}
                                   for c in shared["teacher_check"]]
    return {**shared, PUBLISHED_KEY: {"from": digest, "as": json_digest(shared)}}


@dataclass
class Published:
    """What `mealv2 publish` wrote."""

    dest: str
    digest: str                       # the copy's identity: its original's
    specs: list[tuple[str, str]]      # each teacher's spec in the original, in the copy
    images: int
    rounds: int
    nbytes: int


def publish_copy(source, dest, guard=None) -> Published:
    """Write a copy of the finished store ``source`` to ``dest`` (a local path or a URL that takes writes)
    with :func:`shared_attrs`. ``dest`` must hold no store: it is absent, empty, or holds what a publish cut
    short left. The copy is built aside and checked whole (every chunk's CRC32C: a damaged or changing
    source is refused), then appears at once, durably (objects.py's ``publish``: files and folders synced
    before the rename; at a URL its root ``zarr.json`` uploaded last). ``guard()``: raises when the caller
    may no longer write ``dest`` (its lease was lost), checked before the copy appears."""
    store = LabelStore.open(source)
    if not store.complete:
        raise StoreError(f"{store.path}: {store.rounds_complete()} of {store.rounds_planned} rounds complete; only a "
                         f"finished store is published. Finish it by re-running its `mealv2 label` command:\n  "
                         f"{store.label_command()}")
    target = open_objects(dest)
    if target.exists("zarr.json"):
        raise StoreError(f"{target.location} already holds a label store; publish writes a new one: choose another "
                         f"DEST, or delete that store first")
    keys = [k for k in store.objects.keys() if not k.endswith(PARTIAL)   # noqa: SIM118 (a listing, not a dict)
            and not (k.startswith(f"{STAGED}/") and not k.endswith("zarr.json"))]   # a kill's staged leftovers
    built = target.build_folder()
    shutil.rmtree(built, ignore_errors=True)
    try:
        for key in keys:
            (built / key).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(store.objects.file(key), built / key)
        attrs = shared_attrs(store.attrs, store.digest)
        zarr.open_group(zarr.storage.LocalStore(built), mode="r+").attrs.update(
            {ATTR_KEY: attrs, DIGEST_KEY: json_digest(attrs)})
        if problems := LabelStore.open(built).verify():
            raise StoreError(f"{store.path} is damaged (or changed while copied): "
                             + "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
                             + f"; nothing was published. `mealv2 verify {store.path}` lists every problem")
        nbytes = sum(f.stat().st_size for f in built.rglob("*") if f.is_file())
        if guard is not None:
            guard()
        target.publish(built)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    return Published(dest=str(target.location), digest=store.digest, images=store.num_images,
                     rounds=store.rounds_planned, nbytes=nbytes,
                     specs=[(t["spec"], s["spec"]) for t, s in zip(store.attrs["teachers"], attrs["teachers"])])
