"""What every crop loader takes and yields: a request (images, boxes, flips), the views to render,
the batch; and the reference decode and normalisation both backends match."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..dataset import DatasetError

if TYPE_CHECKING:
    from PIL import Image

    from ..dataset import DatasetIndex


@dataclass(frozen=True)
class View:
    """One normalised rendering of the crops."""

    res: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class CropRequest:
    ids: np.ndarray     # (b,) int64 dataset image ids
    boxes: np.ndarray   # (b, C, 4) uint16 grid boxes
    flips: np.ndarray   # (b, C) bool


@dataclass
class CropBatch:
    ids: np.ndarray                 # (b,) image ids
    views: list[torch.Tensor]       # per view: (b * C, 3, res, res) float32, on the pipeline's device
    crcs: np.ndarray                # (b,) uint32 CRC32C of each image file's bytes as read


def read_bytes(index: DatasetIndex, image_id: int) -> np.ndarray:
    return np.fromfile(index.path(int(image_id)), dtype=np.uint8)


def undecodable(named: str, why: str) -> DatasetError:
    """The error for image file(s) ``named`` that a loader's decoder rejects (``why``), with the fix."""
    return DatasetError(f"cannot decode {named}: {why}; expected a decodable image. Replace it with a readable "
                        f"copy of the same size and run the command again")


def decode_rgb(path_or_file) -> "Image.Image":
    """Decode as DALI does: EXIF orientation applied, 16-bit scaled to 8-bit, RGB."""
    from PIL import Image, ImageOps

    with Image.open(path_or_file) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.uint32) >> 8
            im = Image.fromarray(arr.astype(np.uint8))
        return im.convert("RGB")


def normalise(images: torch.Tensor, mean, std, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float, as torchvision's ToTensor + Normalize compute it (into ``out``
    when given: a loader thread's slice of its batch)."""
    m, s = (torch.tensor(v, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) for v in (mean, std))
    out = images.float() if out is None else out.copy_(images)
    return out.div_(255).sub_(m).div_(s)
