"""Decode each image once and render its stored crops: the DALI pipeline both stages use.

A request is (image ids, boxes, flips) for a batch of images with C crops each. The
pipeline decodes every image once (nvJPEG through ``mixed`` on a GPU, DALI's CPU backend
otherwise), cuts its C boxes, resizes them, mirrors the flipped ones and normalises them
once per *view* (resolution, mean, std): the student's, or each distinct teacher's. The
batch comes back as images x C crops, image-major, like FKD's ``num_crops``.

:func:`.torch.iterate_crops_torch` renders the same boxes without DALI; both take and yield
the same things, and ``registry.LOADERS`` picks one.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Iterable, Iterator

import crc32c
import numpy as np
import torch

from ..crops import boxes_to_relative
from .base import CropBatch, CropRequest, View, read_bytes, undecodable

if TYPE_CHECKING:
    from ..dataset import DatasetIndex


def _meta(image_id: int, data: np.ndarray) -> np.ndarray:
    """(id, CRC32C of the bytes): the image's identity travels through DALI with its pixels."""
    return np.array([image_id, crc32c.crc32c(data)], dtype=np.int64)


class _Source:
    """DALI external source: turns requests into encoded images and per-crop ROIs."""

    def __init__(self, index: DatasetIndex, requests: Iterable[CropRequest]):
        self.index, self.requests = index, iter(requests)
        self.fed: deque = deque()   # ids of the requests handed to DALI and not yet yielded

    def __iter__(self):
        return self

    def __next__(self):
        req = next(self.requests)  # StopIteration ends the DALI epoch
        self.fed.append(req.ids)
        rel = boxes_to_relative(req.boxes)                       # (b, C, 4) y, x, h, w
        start = np.ascontiguousarray(rel[..., :2])
        end = np.ascontiguousarray(rel[..., :2] + rel[..., 2:])
        encoded = [read_bytes(self.index, i) for i in req.ids]
        return (encoded, list(start), list(end), list(req.flips.astype(np.int32)),
                [_meta(int(i), data) for i, data in zip(req.ids, encoded)])


def _build_pipeline(source: _Source, views: list[View], crops: int, batch_size: int, device: str,
                    threads: int, prefetch: int):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device == "cuda"

    @pipeline_def(batch_size=batch_size, num_threads=threads,
                  device_id=torch.cuda.current_device() if gpu else None,
                  prefetch_queue_depth=prefetch, exec_dynamic=True)
    def pipe():
        encoded, start, end, flips, meta = fn.external_source(source=source, num_outputs=5, batch=True,
                                                             dtype=[types.UINT8, types.FLOAT, types.FLOAT,
                                                                    types.INT32, types.INT64])
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        outs = []
        for view in views:
            for c in range(crops):
                crop = fn.resize(images, size=[view.res, view.res], roi_start=start[c], roi_end=end[c],
                                 roi_relative=True, antialias=True, interp_type=types.INTERP_LINEAR)
                outs.append(fn.crop_mirror_normalize(
                    crop, mirror=flips[c], dtype=types.FLOAT, output_layout="CHW",
                    mean=[255 * m for m in view.mean], std=[255 * s for s in view.std]))
        return (meta, *outs)

    return pipe()


def iterate_crops(index: DatasetIndex, requests: Iterable[CropRequest], views: list[View], crops: int,
                  batch_size: int, device: str = "cpu", threads: int = 2,
                  prefetch: int = 2) -> Iterator[CropBatch]:
    """Yield a :class:`CropBatch` per request, rendered by DALI (decode once per image)."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    source = _Source(index, requests)
    pipe = _build_pipeline(source, views, crops, batch_size, device, threads, prefetch)
    names = ["meta"] + [f"v{v}_c{c}" for v in range(len(views)) for c in range(crops)]
    loader = iter(DALIGenericIterator(pipe, names, last_batch_policy=LastBatchPolicy.PARTIAL,
                                      auto_reset=False, prepare_first_batch=False))
    while True:
        try:
            (out,) = next(loader)
        except StopIteration:
            return
        except RuntimeError as e:
            if "decoders.image" not in str(e):
                raise
            # A file whose header passed the index's check but whose data DALI cannot decode.
            paths = [index.path(int(i)) for ids in source.fed for i in ids]
            raise _find_undecodable(paths) from None
        source.fed.popleft()
        meta = out["meta"].reshape(-1, 2).cpu().numpy()
        yield CropBatch(ids=meta[:, 0], crcs=meta[:, 1].astype(np.uint32), views=[
            torch.stack([out[f"v{v}_c{c}"] for c in range(crops)], dim=1).flatten(0, 1)
            for v in range(len(views))])


def _find_undecodable(paths: list) -> Exception:
    """A DatasetError naming the file(s) among ``paths`` that DALI's CPU decoder rejects."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1,
                  exec_async=False, exec_pipelined=False)
    def one():
        return fn.decoders.image(fn.external_source(name="enc", dtype=types.UINT8, ndim=1),
                                 device="cpu", output_type=types.RGB)

    bad, pipe = [], None
    for path in paths:
        if pipe is None:   # a failed run leaves the pipeline unusable
            pipe = one()
            pipe.build()
        pipe.feed_input("enc", [np.fromfile(path, dtype=np.uint8)])
        try:
            pipe.run()
        except Exception:   # DALI reports a decode failure as RuntimeError (IndexError after it)
            bad.append(str(path))
            pipe = None
    named = ", ".join(bad) if bad else "one of " + ", ".join(map(str, paths))
    return undecodable(named, "its header is valid but DALI's image decoder fails on its data (a corrupt image)")
