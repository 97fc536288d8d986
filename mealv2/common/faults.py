"""Named fault-injection points, so tests can kill a run at an exact moment.

``MEALV2_KILL_AT=point:n`` makes the process SIGKILL itself the n-th time it reaches
``fault_point(point)`` (n defaults to 1). Unset, a fault point costs one dict lookup.
The points are the moments where an interruption could hurt: between decoding and the
teachers, mid chunk write, between a shard's data and its done mark, mid append, and
between writing a checkpoint's temp file and renaming it.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

_hits: Counter = Counter()


def _target() -> tuple[str, int] | None:
    spec = os.environ.get("MEALV2_KILL_AT")
    if not spec:
        return None
    point, _, count = spec.partition(":")
    return point, int(count or 1)


def fault_point(name: str) -> None:
    target = _target()
    if target is None or target[0] != name:
        return
    _hits[name] += 1
    if _hits[name] >= target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
