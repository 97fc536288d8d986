"""The crop loader without DALI: the same boxes, flips and image/crop order, rendered by torch.

Bytes are read (and their CRC32C taken) on ``threads`` CPU threads, ``prefetch`` requests ahead.
Where the pixels are decoded is the one choice (``decode_on``):

* ``threads`` (a CPU run): each thread decodes its image and cuts + resizes its C boxes to uint8;
  torchvision's JPEG decoder and uint8 antialiased resize release the GIL, so this scales with
  the threads (BENCHMARKS.md, "Loader").
* ``device`` (a GPU run): the batch's plain JPEGs are decoded together with
  ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA), and the boxes are cut and
  resized there. The same code runs on a CPU, which is how the tests check it.

Either way crops leave the renderer as uint8 (a quarter of float32's bytes; pinned and copied
without blocking when they cross to a GPU), and are flipped and normalised once per batch on
the device: no per-crop float work on the CPU.

Decoding matches DALI's (and :func:`~mealv2.common.crop_loader.decode_rgb`'s): EXIF orientation
applied, grayscale expanded to RGB, 16-bit scaled to 8-bit. JPEGs in RGB or grayscale go through
libjpeg-turbo (CPU) or nvJPEG (device), which give PIL's pixels; an EXIF-rotated JPEG is decoded
on the CPU (torchvision's device decoder does not rotate), and every other file by PIL.
"""
from __future__ import annotations

import io
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterable, Iterator

import crc32c
import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from .crop_loader import CropBatch, CropRequest, View, decode_rgb, normalise, read_bytes
from .crops import boxes_to_relative

if TYPE_CHECKING:
    from .dataset import DatasetIndex

_JPEG = b"\xff\xd8\xff"
_ORIENTATION = 0x0112


def _decode_jpeg(data, **kwargs):
    # torchvision 0.29 deprecates its decoders in favour of TorchCodec, which is not a dependency;
    # the warning would print on every batch.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, **kwargs)


def jpeg_kind(data: np.ndarray) -> str:
    """``plain`` (an RGB/grayscale JPEG, upright), ``rotated`` (one with an EXIF orientation) or
    ``other`` (any other file, PIL's to decode), from the header alone."""
    if bytes(data[:3]) != _JPEG:
        return "other"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("RGB", "L"):
                return "other"
            return "rotated" if im.getexif().get(_ORIENTATION, 1) != 1 else "plain"
    except (OSError, SyntaxError, ValueError):
        return "other"   # PIL's decode names the file and the fault


def decode_cpu(data: np.ndarray, kind: str, path) -> torch.Tensor:
    """uint8 (3, H, W) on the CPU, decoded as DALI decodes; a corrupt file is named."""
    try:
        if kind == "other":
            return F.pil_to_tensor(decode_rgb(io.BytesIO(data.tobytes())))
        return _decode_jpeg(torch.from_numpy(data), apply_exif_orientation=True)
    except (OSError, SyntaxError, ValueError, RuntimeError) as e:   # PIL's and libjpeg's "corrupt data"
        from .dataset import DatasetError
        raise DatasetError(f"cannot decode {path}: {e}; expected a decodable image") from None


def render_crops(image: torch.Tensor, boxes: np.ndarray, views: list[View]) -> list[torch.Tensor]:
    """Per view the (C, 3, res, res) uint8 crops of one uint8 (3, H, W) image, on its device.

    ``boxes`` are relative (y, x, h, w); each is cut at the pixels DALI's ROI rounds to and
    resized with an antialiased bilinear filter (DALI's ``antialias=True, INTERP_LINEAR``).
    """
    h, w = image.shape[-2:]
    per_view = [[] for _ in views]
    for y, x, bh, bw in boxes:
        top, left = round(float(y) * h), round(float(x) * w)
        height = max(1, round(float(y + bh) * h) - top)
        width = max(1, round(float(x + bw) * w) - left)
        for out, view in zip(per_view, views):
            out.append(F.resized_crop(image, top, left, height, width, [view.res, view.res], antialias=True))
    return [torch.stack(v) for v in per_view]


def _read(index: DatasetIndex, image_id: int) -> tuple[int, np.ndarray, str]:
    data = read_bytes(index, image_id)
    return crc32c.crc32c(data), data, jpeg_kind(data)


def _render_on_thread(index: DatasetIndex, image_id: int, boxes: np.ndarray, views: list[View]):
    """(CRC32C, per-view uint8 crops): a whole image's work on one CPU thread."""
    crc, data, kind = _read(index, image_id)
    return crc, render_crops(decode_cpu(data, kind, index.path(int(image_id))), boxes, views)


def _load_for_device(index: DatasetIndex, image_id: int):
    """(CRC32C, encoded bytes for the device's decoder, or the image decoded here when it cannot)."""
    crc, data, kind = _read(index, image_id)
    if kind == "plain":
        return crc, torch.from_numpy(data)
    return crc, decode_cpu(data, kind, index.path(int(image_id)))


def decode_on_device(index: DatasetIndex, ids: np.ndarray, loaded: list, device: torch.device) -> list[torch.Tensor]:
    """The images of one request as uint8 (3, H, W) on ``device``: the encoded ones in one batched
    ``decode_jpeg`` call; a batch the device decoder refuses is decoded image by image on the CPU,
    which names a corrupt file."""
    encoded = [i for i, payload in enumerate(loaded) if payload.dim() == 1]
    images = [payload.to(device, non_blocking=True) if payload.dim() == 3 else None for payload in loaded]
    if encoded:
        try:
            decoded = _decode_jpeg([loaded[i] for i in encoded], device=device)
        except RuntimeError:
            decoded = [decode_cpu(loaded[i].numpy(), "plain", index.path(int(ids[i]))).to(device) for i in encoded]
        for i, image in zip(encoded, decoded):
            images[i] = image
    return images


def iterate_crops_torch(index: DatasetIndex, requests: Iterable[CropRequest], views: list[View], crops: int,
                        device: str = "cpu", threads: int = 4, prefetch: int = 2, decode_on: str | None = None,
                        **_) -> Iterator[CropBatch]:
    """Yield a :class:`CropBatch` per request, as :func:`~mealv2.common.crop_loader.iterate_crops`
    does. ``decode_on`` (``threads`` or ``device``) defaults to the device for CUDA and to the
    threads for a CPU."""
    dev = torch.device(device)
    decode_on = decode_on or ("device" if dev.type == "cuda" else "threads")
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        requests = iter(requests)
        while True:
            while len(pending) <= prefetch and (req := next(requests, None)) is not None:
                rel = boxes_to_relative(req.boxes)
                pending.append((req, rel, [
                    pool.submit(_render_on_thread, index, i, boxes, views) if decode_on == "threads"
                    else pool.submit(_load_for_device, index, i) for i, boxes in zip(req.ids, rel)]))
            if not pending:
                return
            req, rel, futures = pending.popleft()
            done = [f.result() for f in futures]   # a read or decode error surfaces here, naming the file
            crcs = np.asarray([crc for crc, _ in done], np.uint32)
            if decode_on == "threads":
                rendered = [per_view for _, per_view in done]
            else:
                images = decode_on_device(index, req.ids, [payload for _, payload in done], dev)
                rendered = [render_crops(image, boxes, views) for image, boxes in zip(images, rel)]
            flips = torch.from_numpy(np.asarray(req.flips, bool).reshape(-1)).to(dev)
            yield CropBatch(ids=np.asarray(req.ids), crcs=crcs, views=[
                finish(torch.cat([per_view[v] for per_view in rendered]), flips, view, dev)
                for v, view in enumerate(views)])


def finish(crops: torch.Tensor, flips: torch.Tensor, view: View, device: torch.device) -> torch.Tensor:
    """uint8 crops -> the device (pinned, non-blocking from a CPU to a GPU), mirrored where
    ``flips``, normalised: the float work happens once per batch, on the device."""
    if crops.device != device:
        crops = (crops.pin_memory() if device.type == "cuda" else crops).to(device, non_blocking=True)
    crops = torch.where(flips.view(-1, 1, 1, 1), crops.flip(-1), crops)
    return normalise(crops, view.mean, view.std)
