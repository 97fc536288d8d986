"""The crop loader without DALI: the same boxes, flips and image/crop order, rendered by torch.

Bytes are read (and their CRC32C taken) on ``threads`` CPU threads, ``prefetch`` requests ahead.
Where the pixels are decoded is the one choice (``decode_on``):

* ``threads`` (a CPU run): each thread decodes its image and cuts + resizes its C boxes to uint8;
  torchvision's JPEG decoder and uint8 antialiased resize release the GIL, so this scales with
  the threads (BENCHMARKS.md, "Loader").
* ``device`` (a GPU run): the batch's plain JPEGs are decoded together with
  ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA), and the boxes are cut and
  resized there. The same code runs on a CPU, which is how the tests check it.

Crops leave the renderer as uint8. For a GPU run they are normalised there, once per batch, and
those the CPU threads render travel as uint8 (a quarter of float32's bytes) in pinned memory,
copied without blocking: no float work on the CPU. For a CPU run the CPU is the device: each
thread normalises its own image's crops into its slice of the batch, so that work scales with
the threads too instead of running on the thread that yields.

Decoding matches DALI's (and :func:`~mealv2.common.data.loaders.dali.decode_rgb`'s): EXIF orientation
applied, grayscale expanded to RGB, 16-bit scaled to 8-bit. JPEGs in RGB or grayscale go through
libjpeg-turbo on the CPU (PIL's pixels exactly) or nvJPEG on a GPU (whose IDCT may round a level
differently); an EXIF-rotated JPEG is decoded on the CPU (torchvision's device decoder does not
rotate), and every other file by PIL.
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

from .base import CropBatch, CropRequest, View, decode_rgb, normalise, read_bytes
from ..crops import boxes_to_relative

if TYPE_CHECKING:
    from ..dataset import DatasetIndex

_JPEG = b"\xff\xd8\xff"
_ORIENTATION = 0x0112


def decode_jpeg_rgb(data, **kwargs):
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
        return decode_jpeg_rgb(torch.from_numpy(data), apply_exif_orientation=True)
    except (OSError, SyntaxError, ValueError, RuntimeError) as e:   # PIL's and libjpeg's "corrupt data"
        from ..dataset import DatasetError
        raise DatasetError(f"cannot decode {path}: {e}; expected a decodable image") from None


def render_crops(image: torch.Tensor, boxes: np.ndarray, flips: np.ndarray, views: list[View]) -> list[torch.Tensor]:
    """Per view the (C, 3, res, res) uint8 crops of one uint8 (3, H, W) image, on its device.

    ``boxes`` are relative (y, x, h, w); each is cut at the pixels DALI's ROI rounds to, resized
    with an antialiased bilinear filter (DALI's ``antialias=True, INTERP_LINEAR``) and mirrored
    where ``flips``.
    """
    h, w = image.shape[-2:]
    per_view = [[] for _ in views]
    for (y, x, bh, bw), flip in zip(boxes, flips):
        top, left = round(float(y) * h), round(float(x) * w)
        height = max(1, round(float(y + bh) * h) - top)
        width = max(1, round(float(x + bw) * w) - left)
        for out, view in zip(per_view, views):
            crop = F.resized_crop(image, top, left, height, width, [view.res, view.res], antialias=True)
            out.append(crop.flip(-1) if flip else crop)
    return [torch.stack(v) for v in per_view]


def _read(index: DatasetIndex, image_id: int) -> tuple[int, np.ndarray, str]:
    data = read_bytes(index, image_id)
    return crc32c.crc32c(data), data, jpeg_kind(data)


def _render_on_thread(index: DatasetIndex, image_id: int, boxes: np.ndarray, flips: np.ndarray, views: list[View],
                      out: list[torch.Tensor]) -> int:
    """A whole image's work on one CPU thread: its crops written into its slices ``out`` of the
    batch (normalised there when the batch is float, i.e. for a CPU run); returns its CRC32C."""
    crc, data, kind = _read(index, image_id)
    image = decode_cpu(data, kind, index.path(int(image_id)))
    for crops, view, slot in zip(render_crops(image, boxes, flips, views), views, out):
        normalise(crops, view.mean, view.std, out=slot) if slot.is_floating_point() else slot.copy_(crops)
    return crc


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
            decoded = decode_jpeg_rgb([loaded[i] for i in encoded], device=device)
        except RuntimeError:
            decoded = [decode_cpu(loaded[i].numpy(), "plain", index.path(int(ids[i]))).to(device) for i in encoded]
        for i, image in zip(encoded, decoded):
            images[i] = image
    return images


def iterate_crops_torch(index: DatasetIndex, requests: Iterable[CropRequest], views: list[View], crops: int,
                        device: str = "cpu", threads: int = 4, prefetch: int = 2, decode_on: str | None = None,
                        **_) -> Iterator[CropBatch]:
    """Yield a :class:`CropBatch` per request, as :func:`~mealv2.common.data.loaders.dali.iterate_crops`
    does. ``decode_on`` (``threads`` or ``device``) defaults to the device for CUDA and to the
    threads for a CPU."""
    dev = torch.device(device)
    decode_on = decode_on or ("device" if dev.type == "cuda" else "threads")
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        requests = iter(requests)
        while True:
            while len(pending) <= prefetch and (req := next(requests, None)) is not None:
                rel, flips = boxes_to_relative(req.boxes), np.asarray(req.flips, bool)
                if decode_on == "threads":
                    out = batch_buffers(len(req.ids) * crops, views, dev)
                    pending.append((req, out, [
                        pool.submit(_render_on_thread, index, i, boxes, f, views,
                                    [v[j * crops:(j + 1) * crops] for v in out])
                        for j, (i, boxes, f) in enumerate(zip(req.ids, rel, flips))]))
                else:
                    pending.append((req, None, [pool.submit(_load_for_device, index, i) for i in req.ids]))
            if not pending:
                return
            req, out, futures = pending.popleft()
            done = [f.result() for f in futures]   # a read or decode error surfaces here, naming the file
            if decode_on == "threads":
                crcs = done
            else:
                crcs = [crc for crc, _ in done]
                images = decode_on_device(index, req.ids, [payload for _, payload in done], dev)
                rendered = [render_crops(image, boxes, f, views) for image, boxes, f
                            in zip(images, boxes_to_relative(req.boxes), np.asarray(req.flips, bool))]
                out = [torch.cat([per_view[v] for per_view in rendered]) for v in range(len(views))]
            yield CropBatch(ids=np.asarray(req.ids), crcs=np.asarray(crcs, np.uint32),
                            views=[on_device(x, view, dev) for x, view in zip(out, views)])


def iterate_crops_torch_cpu(*args, **kwargs) -> Iterator[CropBatch]:
    """:func:`iterate_crops_torch` decoding on the CPU threads whatever the device (``--loader torch-cpu``)."""
    return iterate_crops_torch(*args, decode_on="threads", **kwargs)


def batch_buffers(n: int, views: list[View], device: torch.device) -> list[torch.Tensor]:
    """Per view the batch the CPU threads write into: float for a CPU run (normalised there, by
    the threads), else uint8 in pinned memory (a quarter of the bytes, copied without blocking)."""
    if device.type == "cpu":
        return [torch.empty(n, 3, v.res, v.res) for v in views]
    return [torch.empty(n, 3, v.res, v.res, dtype=torch.uint8, pin_memory=True) for v in views]


def on_device(crops: torch.Tensor, view: View, device: torch.device) -> torch.Tensor:
    """A view's batch on ``device``, normalised: uint8 crops are normalised there, once per batch."""
    if crops.is_floating_point():
        return crops
    return normalise(crops.to(device, non_blocking=True), view.mean, view.std)
