"""Local files the product writes and later trusts, and where its machine-local cache lives."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$MEALV2_CACHE``, else ``$XDG_CACHE_HOME/mealv2``, else ``~/.cache/mealv2``."""
    if os.environ.get("MEALV2_CACHE"):
        return Path(os.environ["MEALV2_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mealv2"
