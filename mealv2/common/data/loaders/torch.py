"""The crop loader without DALI: the same boxes, flips and image/crop order, rendered by torch.

Bytes are read (and their CRC32C taken) on ``threads`` CPU threads, ``prefetch`` requests ahead.
Where the pixels are decoded is the one choice (``decode_on``):

* ``threads`` (a CPU run): each thread decodes its image and cuts + resizes its C boxes to uint8;
  torchvision's JPEG decoder and uint8 antialiased resize release the GIL, so this scales with
  the threads (BENCHMARKS.md, "Loader").
* ``device`` (a GPU run): the batch's plain JPEGs are decoded together with
  ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA), and :func:`render_batch`
  cuts, resizes, mirrors and normalises all the request's crops there in a number of device
  operations that does not grow with the crops. The same code runs on a CPU, which is how the
  tests and ``mealv2 bench loader`` check it.

Either way the work runs on the producer thread (:mod:`.producer`), not on the one that trains.
Crops the CPU threads render leave them as uint8: for a GPU run they travel as uint8 (a quarter
of float32's bytes) in pinned memory, copied without blocking, and are normalised on the device
once per batch. For a CPU run the CPU is the device: each thread normalises its own image's
crops into its slice of the batch, so that work scales with the threads too.

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

from .base import CropBatch, CropRequest, View, decode_rgb, normalise, read_bytes, undecodable
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
        raise undecodable(str(path), str(e)) from None


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


def render_batch(images: list[torch.Tensor], boxes: np.ndarray, flips: np.ndarray,
                 views: list[View]) -> list[torch.Tensor]:
    """Per view the (b * C, 3, res, res) normalised float crops of ``images`` (b uint8 (3, H, W) on
    one device), image-major, in device operations that do not grow with C.

    ``boxes`` (b, C, 4) are relative (y, x, h, w). Each crop is resized as two matrix products
    over its window of the image, rows (res x window) @ pixels @ columns (window x res), whose
    matrices hold DALI's (and PIL's) antialiased linear filter: a triangle of radius
    max(1, box / res) source pixels around each output pixel's position, taken from the box's
    fractional corners, border pixels repeated. So the crops are DALI's up to rounding, enlarged
    or shrunk, and a shrink is antialiased. A flipped crop's column matrix is reversed, which
    mirrors it at no cost.

    Device operations: per request, the windows' pixel indices and each view's filter positions
    are copied once and the matrices built from them in a few operations; per image, one gather
    of its crops' windows, one conversion to float and two products per view; per view, a
    concatenation, rounding to whole levels (DALI's resize yields uint8) and the normalisation.
    Memory: per view the matrices, n crops x 2 x res x the widest window float32 (about 120 MB
    for 128 crops of 500 x 375 images at 224 px), and per image its crops' windows in float.
    """
    crops, device = boxes.shape[1], images[0].device
    size = np.repeat(np.array([image.shape[-2:] for image in images], np.float64), crops, 0)   # (n, 2): h, w
    start, extent = boxes[..., :2].reshape(-1, 2) * size, boxes[..., 2:].reshape(-1, 2) * size   # (n, 2) pixels
    reach = np.maximum(extent / min(view.res for view in views), 1)   # the widest filter's radius, any view
    first = np.floor(start - reach)                                   # each window's first pixel
    span = np.ceil(extent + 2 * reach).astype(np.int64) + 2           # each window's length
    length = span.max(0)
    pixels = np.concatenate([np.clip(first[:, a, None] + np.arange(length[a]), 0, size[:, a, None] - 1)
                             for a in (0, 1)], 1)
    rows, cols = torch.from_numpy(pixels.astype(np.int64)).to(device, non_blocking=True).split(list(length), 1)
    flips = np.asarray(flips, bool).reshape(-1)
    matrices = [resize_matrices(start - first, extent, flips, view.res, length, device) for view in views]
    channel = torch.arange(3, device=device)[:, None]
    per_view = [[] for _ in views]
    for j, image in enumerate(images):
        mine = slice(j * crops, (j + 1) * crops)
        height, width = span[mine].max(0)
        window = image[channel, rows[mine, :height, None, None], cols[mine, None, None, :width]].float()  # (C, h, 3, w)
        for out, (down, across), view in zip(per_view, matrices, views):
            tall = down[mine, :, :height] @ window.flatten(2)                                  # (C, res, 3 * w)
            out.append((tall.view(crops, -1, width) @ across[mine, :width]).view(crops, view.res, 3, view.res))
    return [normalise(torch.cat(out, 0).permute(0, 2, 1, 3).contiguous().round_(), view.mean, view.std)
            for out, view in zip(per_view, views)]


def resize_matrices(start: np.ndarray, extent: np.ndarray, flips: np.ndarray, res: int, length: np.ndarray,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (n, res, rows) and (n, columns, res) matrices that resize n boxes to res x res:
    ``start`` and ``extent`` (n, 2: y, x) in pixels of each box's window, ``length`` the windows'
    (rows, columns). Built on ``device`` from each output pixel's source position and 1 / radius."""
    scale = extent / res                                                     # source pixels per output pixel
    centre = start[..., None] + (np.arange(res) + 0.5) * scale[..., None]   # (n, 2, res), in window pixels
    centre[flips, 1] = centre[flips, 1, ::-1]                                # mirrored columns
    at = np.concatenate([centre - 0.5, -1 / np.maximum(scale, 1)[..., None]], -1)   # pixel centres at i + 0.5
    at = torch.from_numpy(at.astype(np.float32)).to(device, non_blocking=True)
    pixel = torch.arange(int(length.max()), dtype=torch.float32, device=device)
    weights = (pixel - at[..., :res, None]).abs_().mul_(at[..., res:, None]).add_(1).clamp_(min=0)   # triangle
    weights.div_(weights.sum(-1, keepdim=True))   # (n, 2, res, L)
    return weights[:, 0, :, :length[0]], weights[:, 1, :, :length[1]].transpose(-1, -2)


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
    pool = ThreadPoolExecutor(threads)
    try:
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
                out = render_batch(images, boxes_to_relative(req.boxes), req.flips, views)
            yield CropBatch(ids=np.asarray(req.ids), crcs=np.asarray(crcs, np.uint32),
                            views=[on_device(x, view, dev) for x, view in zip(out, views)])
    finally:   # stopped early (the taker closed it, or an error): the requests read ahead are dropped
        pool.shutdown(cancel_futures=True)


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
