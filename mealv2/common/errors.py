"""The error every user-facing failure derives from: the CLI prints it without a traceback."""
from __future__ import annotations

import math


class MealV2Error(Exception):
    """Bad input or state a user can fix; the message names the file or value and what was expected."""


def require_finite(where: str, **values: float) -> None:
    """Refuse nan and inf among ``values`` (field name: value): a non-finite lr or temperature
    trains or labels garbage and exits 0, so configs built in Python are checked as flags are."""
    bad = [f"{name} = {value!r}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise MealV2Error(f"{where}: {', '.join(bad)} is not a finite number; expected a finite float")


def require_in_range(where: str, ranges: dict, **values) -> None:
    """Refuse values outside the range their flag takes: ``ranges`` maps a name to (min, max, min_open), max
    None for unbounded; None values (unset options) pass. Configs built in Python meet the CLI's ranges."""
    for name, (lo, hi, lo_open) in ranges.items():
        value = values[name]
        if value is None:
            continue
        if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
            span = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise MealV2Error(f"{where}: {name} = {value!r} is out of range; expected a number {span}")
