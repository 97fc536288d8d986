"""Click options shared by several commands, so a flag means the same thing everywhere."""
from __future__ import annotations

from fractions import Fraction

import click

from .crops import CropParams

POSITIVE = click.IntRange(min=1)


def _float_pair(ctx, param, value):
    """'MIN,MAX' with decimals or fractions ('3/4,4/3' is exactly torchvision's ratio range)."""
    try:
        lo, hi = (float(Fraction(v.strip())) for v in value.split(","))
    except (ValueError, ZeroDivisionError):
        raise click.BadParameter(f"expected two numbers 'MIN,MAX', got '{value}'") from None
    return lo, hi


def crop_options(f):
    """--res, --scale, --ratio, --crops-per-image: the random-resized-crop distribution."""
    for option in reversed([
        click.option("--res", type=POSITIVE, default=224, show_default=True,
                     help="Side of the square crop fed to the network."),
        click.option("--scale", default="0.08,1", show_default=True, callback=_float_pair,
                     help="Range of the crop's area relative to the image (RandomResizedCrop)."),
        click.option("--ratio", default="3/4,4/3", show_default=True, callback=_float_pair,
                     help="Range of the crop's aspect ratio (RandomResizedCrop)."),
        click.option("--crops-per-image", "crops_per_image", type=POSITIVE, default=4, show_default=True,
                     help="Crops cut from one decoded image (FKD's num_crops)."),
    ]):
        f = option(f)
    return f


def crop_params(res: int, scale, ratio) -> CropParams:
    try:
        return CropParams(res=res, scale=tuple(scale), ratio=tuple(ratio))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                             show_default=True, help="auto = CUDA when present.")
workers_option = click.option("--workers", type=POSITIVE, default=4, show_default=True,
                              help="Decoding threads.")
