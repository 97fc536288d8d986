"""Where a command writes: one writer per store and per run folder, and a folder it can write.

A lock is an OS file lock (flock, via ``filelock``): the kernel drops it when its holder dies,
so a killed run leaves no stale lock, while a second live writer is refused. Each lock is keyed
on the resolved real path, so a store or a run folder reached through a symlink, or by another
spelling of its path, has the same lock. The holder writes its pid, host and start time into the
lock file; a refused writer reads them first (some filelock versions truncate the file when
they try the lock) to say who holds it.
"""
from __future__ import annotations

import errno
import os
import socket
import tempfile
import time
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import MealV2Error


def lock_path_beside(path: str | Path) -> Path:
    """``PATH.lock`` beside the real path of ``path`` (symlinks resolved)."""
    real = Path(os.path.realpath(path))
    return real.with_name(real.name + ".lock")


def hold_lock(lock_file: str | Path, target: str | Path, command: str,
              error: type[MealV2Error] = MealV2Error, record: bool = True) -> FileLock:
    """Take ``lock_file`` for ``target`` without waiting, or raise ``error`` naming the holder;
    ``record``: write this process into it (not for a check that releases it at once)."""
    lock_file = Path(lock_file)
    holder = _read_holder(lock_file)
    lock = FileLock(lock_file, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise error(f"{target} is being written by another `mealv2 {command}` process ({holder or 'holder unknown'}; "
                    f"lock {lock_file} is held); refusing to interleave writes. Wait for it to finish, or "
                    f"stop it, or use another path") from None
    if not record:
        return lock
    try:
        lock_file.write_text(f"pid {os.getpid()} on {socket.gethostname()}, since "
                             f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    except OSError:   # the lock holds without the record; a refused writer just cannot name us
        pass
    return lock


def held_by(lock_file: str | Path) -> str | None:
    """Who holds ``lock_file`` now (its holder's record, or 'holder unknown'); None when no one does, or when
    this process cannot tell (no such file, or one it cannot open: a read-only copy). Makes no file."""
    lock_file = Path(lock_file)
    if not lock_file.is_file():
        return None
    holder = _read_holder(lock_file)
    lock = FileLock(lock_file, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return holder or "holder unknown"
    except OSError:
        return None
    lock.release()
    return None


def _read_holder(lock_file: Path) -> str:
    try:
        return lock_file.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def check_writable(path: str | Path, flag: str) -> None:
    """Refuse, before any work, a folder ``path`` (existing or to be made) that cannot be written:
    a probe file is made and removed in it, or in its nearest existing ancestor, since permission
    bits do not tell (root passes them; a read-only mount or a full quota does not)."""
    path = Path(path)
    folder = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor))
    why = None
    if not folder.is_dir():
        why = f"{folder} is a file, not a folder"
    else:
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".mealv2-write-check-"):
                pass
        except OSError as e:
            why = f"{folder}: {e.strerror or e}" + (" (a read-only file system)" if e.errno == errno.EROFS else "")
    if why:
        raise MealV2Error(f"{flag} {path} cannot be written ({why}); choose a folder you can write to, "
                          f"or fix its permissions")
