"""What differs between a store and the command or the dataset it is used with, one line per
difference, so that a refusal names what changed rather than only that something did."""
from __future__ import annotations

import json
import re
from collections.abc import Sequence

from .schema import IDENTITY_KEYS


def settings_differences(stored: dict, new: dict) -> list[str]:
    """The identity settings (schema.IDENTITY_KEYS) on which a store's attributes ``stored`` and a
    labelling command's ``new`` differ; a teacher moved to another path (same weights) is no difference."""
    return _ignore_moved_teachers(_diff({k: stored.get(k) for k in IDENTITY_KEYS}, {k: new.get(k) for k in IDENTITY_KEYS}))


def path_differences(stored: Sequence[str] | None, relpaths: Sequence[str], show: int = 5, *,
                     name: str = "DATA", since: str = "labelling", holder: str = "this store") -> str:
    """What differs between the images a dataset index was made from (``stored``: their relative paths, None
    when ``holder`` has no readable copy) and ``relpaths``, by path: the files ``name`` lacks and adds (``show``
    of each, then their count). One function for every record of an index: a label store's (since labelling)
    and a training run's (since the run started; common/data/dataset.py's index_changes)."""
    if stored is None:
        return f"({holder} has no readable copy of its images' paths: the files that changed cannot be named)"
    old, new = set(stored), set(relpaths)
    gone, added = [p for p in stored if p not in new], [p for p in relpaths if p not in old]
    lines = [f"{name} {what} {len(found)} image(s): {', '.join(found[:show])}{', ...' if len(found) > show else ''}"
             for what, found in (("lacks", gone), ("adds", added)) if found]
    if not lines:
        moved = next((i for i, (a, b) in enumerate(zip(stored, relpaths)) if a != b), None)
        lines.append(f"the same {len(stored)} paths, " + (f"in another order (first at #{moved}: {relpaths[moved]})"
                     if moved is not None else "so their labels (classes) or image sizes differ"))
    return f"dataset changes since {since}: " + "; ".join(lines)


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two attribute dicts, one line per leaf."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif _dict_list(a) and _dict_list(b) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                out += _diff(x, y, f"{prefix}{key}[{i}].")
        elif a != b:
            out.append(f"{prefix}{key}: store has {_short(a)}, this run has {_short(b)}")
    return out


def _ignore_moved_teachers(problems: list[str]) -> list[str]:
    """A teacher is its weights (SHA-256), not the path it was given by: drop a teacher's spec
    line when nothing else about it differs (a moved checkpoint), keep it to name one that does."""
    fields = [re.match(r"teachers\[(\d+)\]\.(\w+):", p) for p in problems]
    changed = {m[1] for m in fields if m and m[2] != "spec"}
    return [p for p, m in zip(problems, fields) if not (m and m[2] == "spec" and m[1] not in changed)]


def _dict_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, dict) for x in v)


def _short(v) -> str:
    if _dict_list(v) and all("spec" in x for x in v):  # teachers: name them, not their whole record
        return f"{len(v)} teacher(s) [{', '.join(x['spec'] for x in v)}]"
    s = json.dumps(v)
    return s if len(s) <= 160 else s[:150] + "...]"
