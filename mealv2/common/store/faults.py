"""Named fault-injection points, so tests can kill a run at an exact moment.

``MEALV2_KILL_AT=point:n`` makes the process SIGKILL itself the n-th time it reaches
``fault_point(point)`` (n defaults to 1); ``MEALV2_DISK_FULL_AT=point:n`` makes it raise
"No space left on device" there instead, as a write would on a full disk. Unset, a fault
point costs two dict lookups.
The points are the moments where an interruption could hurt: between decoding and the
teachers, mid chunk write, between a shard's data and its done mark, mid append, and
between writing a checkpoint's temp file and renaming it.
"""
from __future__ import annotations

import errno
import os
import signal
from collections import Counter

_hits: Counter = Counter()


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _disk_full() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


FAULTS = {"MEALV2_KILL_AT": _kill, "MEALV2_DISK_FULL_AT": _disk_full}


def _target(variable: str) -> tuple[str, int] | None:
    spec = os.environ.get(variable)
    if not spec:
        return None
    point, _, count = spec.partition(":")
    return point, int(count or 1)


def fault_point(name: str) -> None:
    for variable, fault in FAULTS.items():
        target = _target(variable)
        if target is None or target[0] != name:
            continue
        _hits[variable, name] += 1
        if _hits[variable, name] >= target[1]:
            fault()
