"""`mealv2 publish STORE DEST`: a copy of a finished store to share, without its maker's checkpoint folders
(common/store/sharing.py says what is stripped and what stays). Its rules live in PublishConfig, so Python
callers meet the CLI's refusals."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..common.config import check_settings, setting
from ..common.store.label_store import acquire_writer_lock
from ..common.store.locations import StorePath
from ..common.store.objects import is_url
from ..common.store.schema import StoreError
from ..common.store.sharing import Published, publish_copy

# What a published store still tells, as `publish` says it (README: Share a store).
KEPT = ("kept as they are: the images' relative paths (how `train` and `verify --data` match the store to DATA), "
        "the class names, each teacher's architecture or timm name, SHA-256, input and weight, and the labelling "
        "runs (times, crop counts, GPU names)")


@dataclass
class PublishConfig:
    """What ``mealv2 publish`` copies where.

    Args:
        store: the finished store to publish (a local path or a store URL that can be listed).
        dest: where its copy goes: a new or empty local folder, or an s3:// URL holding no store.
    """

    store: str = setting(StorePath())
    dest: str = setting(StorePath(write=True))

    def __post_init__(self):
        check_settings("publish", self, StoreError)
        if _inside(self.dest, self.store):
            where = "the store itself" if _same(self.dest, self.store) else f"inside STORE {self.store}"
            raise StoreError(f"publish: DEST {self.dest} is {where}; the copy goes beside it, not into it: "
                             f"choose a DEST outside STORE")
        if not is_url(self.dest) and Path(self.dest).exists() and not Path(self.dest).is_dir():
            raise StoreError(f"publish: DEST {self.dest} is a file; the copy is a store folder: choose a new or "
                             f"empty folder")


def _location(path) -> str:
    return str(path).rstrip("/") if is_url(path) else str(Path(path).resolve())


def _same(a, b) -> bool:
    return _location(a) == _location(b)


def _inside(dest, store) -> bool:
    """Whether ``dest`` is ``store`` or a path or key under it."""
    d, s = _location(dest), _location(store)
    return d == s or d.startswith(s.rstrip("/") + "/")


def run_publish(cfg: PublishConfig) -> Published:
    """Write the copy (common/store/sharing.publish_copy), holding DEST's writer lock (or lease at a URL) as
    `label` would, so a `label` into DEST cannot interleave with it."""
    lock = acquire_writer_lock(cfg.dest, "publish")
    try:
        return publish_copy(cfg.store, cfg.dest, guard=getattr(lock, "check", None))
    finally:
        lock.release()


def published_lines(done: Published, store) -> list[str]:
    """What `publish` says it wrote, what it stripped, what stays, and how a receiver checks it."""
    changed = [f"  {old} -> {new}" for old, new in done.specs if old != new]
    return [(f"published {store} -> {done.dest}: {done.rounds} rounds of {done.images} images, "
             f"{done.nbytes / 2**20:.1f} MiB; it trains as the original (same labels, digest {done.digest[:12]})"),
            *(["teachers' checkpoint folders stripped (file names kept):", *changed] if changed
              else ["no teacher names a local checkpoint path: nothing stripped"]),
            KEPT,
            f"a receiver checks it with: mealv2 verify {done.dest} --data DATA"]
