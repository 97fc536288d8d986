"""The machine-local cache of a store's remote objects: one folder per store URL, one file per object
version, named by hashes only, so no key (``../x``, ``/etc/x``) can name a file outside the folder.

Layout, under ``$MEALV2_CACHE/stores/`` (files.py's :func:`cache_root`):

- ``<sha256(url)[:24]>/``: a store's folder; its ``URL`` file names the store (its time: last used).
- ``.../<sha256(key)[:40]>.<version>.<crc32c>``: an object's bytes. ``version`` is a digest of what the
  remote says identifies them (objects.py); ``crc32c`` is that of the bytes downloaded, checked with
  the size the remote announces before a cached file is served: a damaged or swapped file is dropped
  and downloaded again, with a line saying so.
- ``.../locks/<sha256(key)[:40]>``: the object's lock: one process of the machine downloads a
  version, the others wait for it and read its file.
- ``.../users/<pid>.<random>``: one per process reading the store, locked while it lives. A newer
  version of an object does not delete the older one while another process uses the store (it may
  have checked the older one and read it for days); old versions are deleted by a process that
  finds itself the store's only user. An object the store deletes (staged chunks after packing) is
  evicted at once: no reader may read it any more.
- ``<sha256(url)[:24]>.lock``: held briefly to join the users or to delete anything, so `mealv2
  cache clear` never deletes a folder a process is joining.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import shutil
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import crc32c
from filelock import FileLock, Timeout

from ..errors import MealV2Error
from .files import PARTIAL, cache_root, make_folders, write_file

CACHE_VARIABLE = "MEALV2_CACHE"
_KEY_HASH = 40   # hex digits of sha256(key) in a file's name


class CacheError(MealV2Error):
    """The cache cannot hold what it must (a full or unwritable disk): named as the cache, never as the store."""


def stores_root() -> Path:
    return cache_root() / "stores"


def store_folder(url: str) -> Path:
    """The cache folder of store ``url``."""
    return stores_root() / hashlib.sha256(url.encode()).hexdigest()[:24]


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:_KEY_HASH]


def file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = crc32c.crc32c(block, crc)
    return crc


def _free(folder: Path) -> str:
    try:
        probe = next(p for p in (folder, *folder.parents) if p.exists())
        return f"{shutil.disk_usage(probe).free / 2**20:.1f} MiB free there"
    except (OSError, StopIteration):
        return "free space unknown"


def cache_failure(folder: Path, what: str, e: OSError) -> CacheError:
    """The message of a cache that cannot hold ``what``: the cache's path and free space, and the fix."""
    why = e.strerror or str(e)
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    return CacheError(f"the local cache {folder} cannot hold {what} ({why}; {_free(folder)}): "
                      + ("free space there (`mealv2 cache clear`)" if full else "make it writable")
                      + f", or set {CACHE_VARIABLE} to a folder with room; the store itself is not at fault")


def _locked_by_other(path: Path) -> bool:
    """Whether another open file holds ``path``'s lock (a dead holder's lock is gone with it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class ObjectCache:
    """The cached objects of one store URL (thread-safe; one per :class:`~.objects.RemoteObjects`)."""

    def __init__(self, url: str):
        self.url = url
        self.folder = store_folder(url)
        self.guard = self.folder.with_name(self.folder.name + ".lock")
        self._user: tuple[int, Path] | None = None
        self._join = threading.Lock()

    def _failure(self, what: str, e: OSError) -> CacheError:
        return cache_failure(self.folder, what, e)

    def _join_users(self) -> None:
        """Count this process among the store's users (once), and, alone, sweep old versions."""
        with self._join:
            if self._user is not None:
                return
            try:
                make_folders(self.folder / "users")
                with FileLock(self.guard):
                    user = self.folder / "users" / f"{os.getpid()}.{secrets.token_hex(4)}"
                    fd = os.open(user, os.O_RDWR | os.O_CREAT, 0o644)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    self._user = (fd, user)
                    self._sweep()
                    if not (self.folder / "URL").is_file():
                        write_file(self.folder / "URL", f"{self.url}\n".encode())
                    os.utime(self.folder / "URL")   # last used
            except OSError as e:
                raise self._failure(f"the objects of {self.url}", e) from None
            weakref.finalize(self, _leave, fd, user)

    def versions(self, key: str) -> list[Path]:
        """The cached files of ``key``, any version."""
        return [p for p in self.folder.glob(f"{key_hash(key)}.*") if not p.name.endswith(PARTIAL)]

    @contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """Hold ``key``'s lock: one download of an object per machine at a time."""
        self._join_users()
        path = self.folder / "locks" / key_hash(key)
        try:
            make_folders(path.parent)
            lock = FileLock(path)
            lock.acquire()
        except OSError as e:
            raise self._failure(f"{self.url}/{key}'s lock", e) from None
        try:
            yield
        finally:
            lock.release()

    def lookup(self, key: str, version: str, size: int | None) -> Path | None:
        """The cached file of ``key`` at ``version``, when its size is ``size`` (the remote's) and its
        bytes are those downloaded; a file failing either is deleted and said. Hold :meth:`locked`."""
        for path in self.folder.glob(f"{key_hash(key)}.{version}.*"):
            if path.name.endswith(PARTIAL):
                continue
            if (why := _unsound(path, size)) is None:
                with contextlib.suppress(OSError):   # a read-only cache still serves
                    os.utime(path)   # last used: sweeping keeps the newest
                return path
            print(f"mealv2: the cached copy of {self.url}/{key} ({path}) {why}: it was damaged or replaced on "
                  f"this machine, not on the remote; deleted it and downloading the object again", file=sys.stderr)
            path.unlink(missing_ok=True)
        return None

    def store(self, key: str, version: str, data: bytes) -> Path:
        """Write ``data`` as ``key``'s file at ``version``; a full or unwritable cache is named as
        such (write_file leaves no temporary file). Hold :meth:`locked`."""
        path = self.folder / f"{key_hash(key)}.{version}.{crc32c.crc32c(data):08x}"
        try:
            write_file(path, data)
        except OSError as e:
            raise self._failure(f"{self.url}/{key} ({len(data)} bytes)", e) from None
        return path

    def drop_versions(self, key: str, keep: Path) -> bool:
        """Delete ``key``'s versions other than ``keep`` where no other process uses the store (else
        they wait for :meth:`_sweep`); whether there were any."""
        others = [p for p in self.versions(key) if p != keep]
        if others:
            self._delete_if_alone(others)
        return bool(others)

    def evict(self, key: str) -> None:
        """Delete every cached version of ``key``: the store deleted it."""
        for path in self.versions(key):
            path.unlink(missing_ok=True)

    def _delete_if_alone(self, paths: list[Path]) -> None:
        try:
            with FileLock(self.guard, timeout=0):
                if not self._other_users():
                    for path in paths:
                        path.unlink(missing_ok=True)
        except Timeout:   # another process joining or sweeping: leave them for a sweep
            pass

    def _other_users(self) -> list[Path]:
        """The users' files of other live processes; dead ones' are deleted. Hold the guard."""
        mine = self._user[1] if self._user else None
        live = []
        for user in (self.folder / "users").glob("*"):
            if user == mine:
                continue
            if _locked_by_other(user):
                live.append(user)
            else:
                user.unlink(missing_ok=True)
        return live

    def _sweep(self) -> None:
        """Alone, delete every object's versions but the one used last, and the locks of objects no
        longer cached. Hold the guard."""
        if self._other_users():
            return
        objects: dict[str, list[Path]] = {}
        for path in self.folder.glob("*.*.*"):
            if not path.name.endswith(PARTIAL):
                objects.setdefault(path.name.split(".")[0], []).append(path)
        for versions in objects.values():
            versions.sort(key=lambda p: p.stat().st_mtime)
            for old in versions[:-1]:
                old.unlink(missing_ok=True)
        for lock in (self.folder / "locks").glob("*"):
            if lock.name not in objects and not _locked_by_other(lock):
                lock.unlink(missing_ok=True)


def _unsound(path: Path, size: int | None) -> str | None:
    """Why cache file ``path`` is not the object of ``size`` bytes that was downloaded; None if it is."""
    try:
        found = path.stat().st_size
        if size is not None and found != size:
            return f"holds {found} bytes, the remote's object {size}"
        if f"{file_crc(path):08x}" != path.name.rsplit(".", 1)[1]:
            return "does not match the CRC32C of the bytes downloaded"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None


def _leave(fd: int, user: Path) -> None:
    user.unlink(missing_ok=True)
    os.close(fd)


# ---- `mealv2 cache ls|clear` -----------------------------------------------------------------
def cached_stores() -> list[dict]:
    """Each store with objects in the cache: its URL, folder, objects, bytes, last use, live users."""
    stores = []
    for folder in sorted(p for p in stores_root().glob("*") if p.is_dir()) if stores_root().is_dir() else ():
        files = [p for p in folder.glob("*.*.*") if p.is_file() and not p.name.endswith(PARTIAL)]
        url_file = folder / "URL"
        try:
            url = url_file.read_text().strip()
            used = url_file.stat().st_mtime
        except OSError:
            url, used = "(unknown: no URL file)", max((p.stat().st_mtime for p in files), default=0.0)
        stores.append({"url": url, "folder": str(folder), "objects": len(files),
                       "bytes": sum(p.stat().st_size for p in files),
                       "last_used": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(used)) if used else None,
                       "users": len([u for u in (folder / "users").glob("*") if _locked_by_other(u)])})
    return stores


def clear_cache(url: str | None = None) -> tuple[list[dict], list[dict]]:
    """Delete the cached objects of every store, or of store ``url``: (cleared, skipped); a store a
    live process is reading is skipped (its objects may be read at any moment)."""
    cleared, skipped = [], []
    for store in cached_stores():
        if url is not None and store["url"] != url:
            continue
        folder = Path(store["folder"])
        guard = folder.with_name(folder.name + ".lock")
        try:
            with FileLock(guard, timeout=0):
                live = [u for u in (folder / "users").glob("*") if _locked_by_other(u)]
                if not live:
                    shutil.rmtree(folder)
        except Timeout:
            live = [guard]
        except OSError as e:
            raise cache_failure(folder, f"the deletion of {store['url']}'s objects", e) from None
        (skipped if live else cleared).append(store)
    return cleared, skipped
