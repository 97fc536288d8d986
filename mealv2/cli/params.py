"""Click parameter types, built from the Settings the configs declare (common/config.py), and the small
options every command shares, so a flag means the same thing everywhere. Imports no torch: `inspect` and
`verify` start without it."""
from __future__ import annotations

import click

from ..common.config import COUNT, DEVICE, FLOAT_FROM_0, Choice, OrNone, Setting
from ..common.data.loaders.registry import LOADER_CHOICES, available_cores
from ..common.store import locations


class Declared(click.ParamType):
    """The click type of a Setting (common/config.py): the flag's word parsed by the setting and refused
    in its words, so the CLI and a config built in Python refuse a value alike."""

    def __init__(self, kind: Setting):
        self.kind = kind
        self.name = kind.expected

    def get_metavar(self, param, ctx=None):
        return self.kind.metavar

    def convert(self, value, param, ctx):
        value = self.kind.parse(value) if isinstance(value, str) else value
        if refusal := self.kind.refusal(value):
            self.fail(refusal, param, ctx)
        return value


class LocalPath(click.Path):
    """click.Path that refuses URLs (common/store/locations.py says why), as the configs do."""

    kind = locations.LocalPath()

    def convert(self, value, param, ctx):
        if isinstance(value, str) and (refusal := self.kind.refusal(value)):
            self.fail(refusal, param, ctx)
        return super().convert(value, param, ctx)


class StorePath(LocalPath):
    """A label store: a local path (click.Path's checks), or a URL checked as the configs do (``write``: a
    store to write, whose protocol has a lease)."""

    def __init__(self, *args, write: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.kind = locations.StorePath(write)

    def convert(self, value, param, ctx):
        if not locations.is_url(value):
            return super().convert(value, param, ctx)
        if refusal := self.kind.refusal(value):
            self.fail(refusal, param, ctx)
        return self.kind.parse(value)


PATH_TYPES = {locations.LocalPath: lambda kind, **checks: LocalPath(**checks),
              locations.StorePath: lambda kind, **checks: StorePath(write=kind.write, **checks)}


def flag_type(kind: Setting, **path_checks) -> click.ParamType:
    """The click type of a flag that takes ``kind``; ``path_checks`` (click.Path's exists=, dir_okay=, ...) for a
    path: whether a file is there is the CLI's to check, a config names files that are made later."""
    kind = kind.inner if isinstance(kind, OrNone) else kind
    return PATH_TYPES.get(type(kind), lambda kind, **_: Declared(kind))(kind, **path_checks)


POSITIVE = flag_type(COUNT)
NON_NEGATIVE = flag_type(FLOAT_FROM_0)


device_option = click.option("--device", type=flag_type(DEVICE), default="auto",
                             show_default=True, help="auto = CUDA when present.")


workers_option = click.option("--workers", type=POSITIVE, default=available_cores,
                              show_default="the cores this process may use", help="Decoding threads.")
loader_option = click.option("--loader", type=flag_type(Choice(LOADER_CHOICES)), default="auto", show_default=True,
                             help="Crop loader: auto = torch on a CPU; on a GPU DALI where installed, else torch "
                                  "(README: which runs where).")


def _trust(ctx, param, value):
    if value:   # the default (untrusted) needs nothing, nor torch imported
        from ..common.models.checkpoints import trusting_checkpoints
        ctx.with_resource(trusting_checkpoints())


trust_option = click.option(
    "--trust-checkpoint", is_flag=True, expose_value=False, callback=_trust,
    help="Unpickle checkpoint files in full, for files you made or trust the source of: by default only "
         "tensors and plain data are read from them, since a crafted pickle runs code as it loads.")
"""--trust-checkpoint: the command loads every checkpoint file (teachers, --init, --resume, eval's, export's)
in full (common/models/checkpoints.py)."""
