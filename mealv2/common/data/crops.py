"""Crop geometry: the random-resized-crop boxes both stages agree on.

Boxes are a pure function of (seed, round, image id, image size): no RNG state is
carried, so a resumed or sharded labelling run draws exactly the crops an
uninterrupted one would, and stage 2 can replay them from the store alone.

Boxes live on a fixed relative grid (``BOX_GRID`` steps per image side) and are
snapped to it *before* anything uses them, so the stored box is exactly the box
the teachers saw, never an approximation of it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..config import Number, Pair, Text, check_settings, setting
from ..errors import MealV2Error

BOX_GRID = 1023          # relative coordinates are q / BOX_GRID, q in [0, BOX_GRID]: 10 bits
_TRIES = 10              # torchvision's RandomResizedCrop makes 10 attempts before its fallback
RES = Number(int, min=1)  # a square crop's side in pixels
CROP_FLAGS = ("res", "scale", "ratio")   # CropParams' fields that are flags of label and train


class CropError(MealV2Error, ValueError):
    """A crop setting out of range (a ValueError too, as it was before configs refused it in Python)."""


@dataclass(frozen=True)
class CropParams:
    """What defines the crop distribution; recorded in the store and checked on reuse."""

    res: int = setting(RES, 224)
    scale: tuple[float, float] = setting(Pair(), (0.08, 1.0))
    ratio: tuple[float, float] = setting(Pair(), (3 / 4, 4 / 3))
    flip_prob: float = setting(Number(float, 0, 1), 0.5)
    interpolation: str = setting(Text(), "bilinear")

    def __post_init__(self):
        check_settings("crop", self, CropError)
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise CropError(f"--scale must satisfy 0 < min <= max <= 1, got {lo},{hi}")
        lo, hi = self.ratio
        if not 0 < lo <= hi < math.inf:
            raise CropError(f"--ratio must satisfy 0 < min <= max, got {lo},{hi}")
        if self.interpolation != "bilinear":
            raise CropError(f"CropParams(interpolation={self.interpolation!r}): only 'bilinear' is supported: both "
                            f"loaders (DALI and torch) resize bilinear, antialiased when shrinking, and a store "
                            f"records what its crops were rendered with; leave interpolation out")

    def to_attrs(self) -> dict:
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d

    @classmethod
    def from_attrs(cls, d: dict) -> "CropParams":
        """The params a store or run records. Its ``interpolation`` is not read: every loader has always
        resized bilinear, so crops recorded as another (a Python caller's, before it was refused) were too."""
        return cls(res=int(d["res"]), scale=tuple(d["scale"]), ratio=tuple(d["ratio"]),
                   flip_prob=float(d["flip_prob"]))


def _image_rng(seed: int, round_: int, image_id: int) -> np.random.Generator:
    # Philox is counter based: one independent stream per (seed, round, image).
    return np.random.Generator(np.random.Philox(key=[seed & 0xFFFFFFFFFFFFFFFF,
                                                     (round_ << 40) | image_id]))


def _boxes_for_image(rng: np.random.Generator, height: int, width: int, crops: int,
                     p: CropParams) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's RandomResizedCrop.get_params for ``crops`` crops, vectorised over tries."""
    area = height * width
    u = rng.random((crops, _TRIES, 4))
    target_area = area * (p.scale[0] + u[..., 0] * (p.scale[1] - p.scale[0]))
    log_lo, log_hi = math.log(p.ratio[0]), math.log(p.ratio[1])
    aspect = np.exp(log_lo + u[..., 1] * (log_hi - log_lo))
    w = np.rint(np.sqrt(target_area * aspect))
    h = np.rint(np.sqrt(target_area / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = np.argmax(ok, axis=1)
    found = ok[np.arange(crops), first]
    pick = lambda a: a[np.arange(crops), first]  # noqa: E731
    h, w, uy, ux = pick(h), pick(w), pick(u[..., 2]), pick(u[..., 3])
    y = np.floor(uy * (height - h + 1))
    x = np.floor(ux * (width - w + 1))
    if not found.all():  # torchvision's fallback: the largest central crop within the ratio range
        in_ratio = width / height
        if in_ratio < p.ratio[0]:
            fw, fh = width, round(width / p.ratio[0])
        elif in_ratio > p.ratio[1]:
            fh, fw = height, round(height * p.ratio[1])
        else:
            fw, fh = width, height
        miss = ~found
        h[miss], w[miss] = fh, fw
        y[miss], x[miss] = (height - fh) // 2, (width - fw) // 2
    rel = np.stack([y / height, x / width, h / height, w / width], axis=1)
    flips = rng.random(crops) < p.flip_prob
    return rel, flips


def sample_crops(seed: int, round_: int, image_ids: np.ndarray, sizes: np.ndarray, crops: int,
                 params: CropParams) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and flips for ``crops`` crops of each image.

    Returns ``boxes`` uint16 (n, crops, 4) as (y, x, h, w) on the ``BOX_GRID`` grid and
    ``flips`` bool (n, crops). Pure: the same arguments always give the same crops, and an
    image's crops do not depend on which other images are in the call.
    """
    n = len(image_ids)
    boxes = np.empty((n, crops, 4), np.uint16)
    flips = np.empty((n, crops), bool)
    for i, (image_id, (height, width)) in enumerate(zip(image_ids, sizes)):
        rel, flips[i] = _boxes_for_image(_image_rng(seed, round_, int(image_id)),
                                         int(height), int(width), crops, params)
        boxes[i] = snap_to_grid(rel)
    return boxes, flips


def snap_to_grid(rel: np.ndarray) -> np.ndarray:
    """Relative (y, x, h, w) -> grid units, keeping every box non-empty and inside the image."""
    q = np.rint(np.asarray(rel) * BOX_GRID).astype(np.int64)
    q[..., 2:] = np.maximum(q[..., 2:], 1)
    q[..., :2] = np.minimum(q[..., :2], BOX_GRID - q[..., 2:])
    return q.astype(np.uint16)


def boxes_to_relative(boxes: np.ndarray) -> np.ndarray:
    """Grid units -> float32 relative (y, x, h, w)."""
    return boxes.astype(np.float32) / BOX_GRID
