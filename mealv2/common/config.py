"""A config's fields as the flags of the same name: the naming both the configs' messages and the CLI use."""
from __future__ import annotations

import dataclasses

FLAG_NAMES = {"classes_file": "--classes", "data": "DATA"}


def field_defaults(cls) -> dict:
    """A dataclass's default per field (factories called): what an untyped flag means."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def flag_name(name: str) -> str:
    """A config field's flag: classes_file -> --classes, w_cutmix -> --w-cutmix."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
