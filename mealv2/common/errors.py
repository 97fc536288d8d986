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

