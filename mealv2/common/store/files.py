"""Local files the product writes and later trusts, and where its machine-local cache lives.

Everything mealv2 writes and reads back later (a store's files on disk, checkpoints, a run's
config.json and metrics.csv, the dataset index cache, cached store objects) is written by
:func:`write_file`: whole or absent, never half-written, and durable once the call returns. On
POSIX a file's bytes are durable after an fsync of the file, but its name only after an fsync of
the folder holding it, and a new folder's only after an fsync of its parent: a power cut can
otherwise lose a renamed file, or a whole new folder of synced files, so each of those is synced
too, up to a folder that existed before.
"""
from __future__ import annotations

import glob
import os
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from itertools import takewhile
from pathlib import Path
from typing import BinaryIO

from .faults import fault_point

PARTIAL = ".partial"   # the suffix of a file being written: all a killed writer leaves


def cache_root() -> Path:
    """``$MEALV2_CACHE``, else ``$XDG_CACHE_HOME/mealv2``, else ``~/.cache/mealv2``."""
    if os.environ.get("MEALV2_CACHE"):
        return Path(os.environ["MEALV2_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mealv2"


def write_file(path: str | Path, data: bytes | Callable[[BinaryIO], object], *, fsync: bool = True,
               fault: str | None = None, sole_writer: bool = False) -> None:
    """Write ``path`` whole or not at all, durably: ``data`` (bytes, or a function writing into the
    open binary file) goes to a temporary file beside it, synced, then renamed over ``path``, and
    the folder's entry is synced (missing folders are made first, :func:`make_folders`).

    ``fsync`` False skips every sync (only to measure what durability costs). ``fault``: a fault
    point (faults.py) between the synced temporary file and the rename. ``sole_writer``: no other
    process writes ``path``, so the temporary files of it that killed writers left are deleted.
    A failed write deletes its temporary file (a full disk stays no fuller) and raises.
    """
    path = Path(path)
    make_folders(path.parent, fsync=fsync)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}{PARTIAL}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if fault:
            fault_point(fault)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync(path.parent)
    if sole_writer:
        left = re.compile(rf"{re.escape(path.name)}\.\d+\.\d+{re.escape(PARTIAL)}")
        for stale in path.parent.glob(f"{glob.escape(path.name)}.*{PARTIAL}"):
            if left.fullmatch(stale.name):
                stale.unlink(missing_ok=True)


def make_folders(folder: str | Path, *, fsync: bool = True) -> None:
    """Make ``folder`` and its missing parents, durably: bottom-up, the parent of each folder made
    is synced, so the new entries survive a power cut up to the folder that existed."""
    folder = Path(folder)
    new = list(takewhile(lambda f: not f.is_dir(), (folder, *folder.parents)))
    if not new:
        return
    folder.mkdir(parents=True, exist_ok=True)
    if fsync:
        for made in new:
            _fsync(made.parent)


def sync_paths(paths: Iterable[str | Path]) -> None:
    """Make files and folders others wrote (zarr's chunk files, say) durable: an fsync of each,
    concurrently, since concurrent fsyncs share the file system's journal commits."""
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(_fsync, {Path(p) for p in paths}))


def publish_folder(built: str | Path, target: str | Path) -> None:
    """Rename folder ``built`` (written by others, unsynced) to ``target``, durably: every file and
    folder in it is synced before the rename, so ``target`` appears complete or not at all, and the
    parent's entry after it. ``target`` must be absent or an empty folder, as for ``os.replace``."""
    built, target = Path(built), Path(target)
    sync_paths([built, *built.rglob("*")])
    os.replace(built, target)
    _fsync(target.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
