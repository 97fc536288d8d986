"""Click parameter types and the small options every command shares, so a flag means the same thing
everywhere. Imports neither torch nor zarr: `inspect` and `verify` start without them."""
from __future__ import annotations

import math
from fractions import Fraction

import click

from ..common.data.loaders.registry import LOADER_CHOICES, available_cores
from ..common.errors import MealV2Error
from ..common.store.lease import writable_url
from ..common.store.objects import READ_BY, check_url, is_url, redact

POSITIVE = click.IntRange(min=1)

class FiniteFloat(click.FloatRange):
    """A float flag (optionally bounded, as click.FloatRange) that refuses nan and inf: click's own
    float type takes them, and every comparison with nan is false, so a range never stops it."""

    name = "finite float"

    def convert(self, value, param, ctx):
        rv = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value} is not a finite number; expected a finite float"
                      + (f" in {self._describe_range()}" if self.min is not None or self.max is not None else ""),
                      param, ctx)
        return super().convert(rv, param, ctx)


FINITE = FiniteFloat()
NON_NEGATIVE = FiniteFloat(min=0)
POSITIVE_FLOAT = FiniteFloat(min=0, min_open=True)


def float_pair(value: str) -> tuple[float, float]:
    """'MIN,MAX' with decimals or fractions ('3/4,4/3' is exactly torchvision's ratio range)."""
    try:
        lo, hi = (float(Fraction(v.strip())) for v in value.split(","))
    except (ValueError, ZeroDivisionError):
        raise click.BadParameter(f"expected two numbers 'MIN,MAX', got '{value}'") from None
    return lo, hi


class LocalPath(click.Path):
    """click.Path that refuses URLs: ``--out s3://b/x.zarr`` would otherwise become the local
    folder ``s3:/b/x.zarr`` without a word. Data, runs and checkpoints are local or mounted paths."""

    def convert(self, value, param, ctx):
        if is_url(value):
            self.fail(f"{redact(value)} is a URL; here mealv2 takes a local path: URLs are taken only as label stores "
                      f"({READ_BY}). Mount it (e.g. s3fs, gcsfuse) or copy it, and pass the local path",
                      param, ctx)
        return super().convert(value, param, ctx)


class StorePath(LocalPath):
    """A label store to read: a local path, or a URL (https://, s3://, other fsspec protocols) that
    common/remote.py reads through its cache; ``write``: to write, a local path or a URL whose
    protocol has a lease (common/lease.py: s3://)."""

    def __init__(self, *args, write: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.write = write

    def convert(self, value, param, ctx):
        if not is_url(value):
            return super().convert(value, param, ctx)
        try:
            return writable_url(value, MealV2Error) if self.write else check_url(value)
        except MealV2Error as e:
            self.fail(str(e), param, ctx)


device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                             show_default=True, help="auto = CUDA when present.")


workers_option = click.option("--workers", type=POSITIVE, default=available_cores,
                              show_default="the cores this process may use", help="Decoding threads.")
loader_option = click.option("--loader", type=click.Choice(LOADER_CHOICES), default="auto", show_default=True,
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
in full (common/models.py)."""
