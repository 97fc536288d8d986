"""A loader's batches made on a thread of their own and handed over finished.

Reading, decoding and rendering run on a producer thread, ``prefetch`` batches ahead of the
thread that takes them (the one that trains, or stage 1's teachers), so that thread never
renders: it takes a finished batch from a bounded queue. Every backend runs this way
(:func:`~mealv2.common.data.loaders.registry.iterate` wraps it), DALI included, whose own
threads decode but whose batches are still gathered into tensors by the thread that asks.

What it holds in memory: up to ``prefetch`` finished batches in the queue (each view's
b x C crops as float32 on the device), one more being made, the last two handed over (their
memory is released on the producer's thread: freeing a large batch of CPU tensors unmaps it,
which would cost the taking thread as much again as taking it), and what the backend holds for
the requests it has started (the torch loader reads ``prefetch`` requests ahead; DALI keeps its
own prefetch queue).

On CUDA the producer works on a stream of its own. Each batch travels with an event recorded
after its work; the taking thread's stream waits on it (the wait is on the GPU, not the CPU),
and the batch's tensors are marked as used on that stream, so the caching allocator does not
hand their memory back to the producer before the training stream is done with them.

An error on the producer (a file that cannot be read or decoded) is raised in the taking thread,
naming the file as the backend named it. The thread stops when the batches end, when the taking
side stops early (a ``break``, ``close()``, an exception or Ctrl-C in the loop that takes them),
and always before :func:`produce`'s generator is done.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch

from .base import CropBatch

_END = object()   # the backend's batches ran out
HELD = 2   # batches the taking side may still hold: the one handed over and, until next() returns, the one before


@dataclass
class _Failed:
    error: BaseException


def produce(batches: Iterator[CropBatch], device: torch.device, prefetch: int) -> Iterator[CropBatch]:
    """The batches of ``batches`` (a backend's iterator, run on a producer thread), handed over
    finished, up to ``prefetch`` (at least 1) waiting. The thread starts at the first ``next``."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())   # the producer's thread starts on GPU 0
    handed: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    spent: deque = deque()   # batches the taking side is done with, released by the producer
    stop = threading.Event()
    thread = threading.Thread(target=_run, args=(batches, handed, spent, stop, device), name="mealv2-loader",
                              daemon=True)
    thread.start()
    held: deque = deque()
    try:
        while (item := handed.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            held.append(_taken(*item, device))
            if len(held) > HELD:
                spent.append(held.popleft())
            yield held[-1]
    finally:
        spent.extend(held)   # freed by the producer too, as it stops
        held.clear()
        stop.set()
        _drain(handed)   # unblocks a producer waiting to put; it puts at most one more, then sees stop
        thread.join()


def _run(batches: Iterator[CropBatch], handed: queue.Queue, spent: deque, stop: threading.Event,
         device: torch.device) -> None:
    """The producer thread: each batch of ``batches`` with its CUDA event (None on a CPU), then
    ``_END``, or ``_Failed`` with what went wrong; nothing more once ``stop`` is set. Batches
    in ``spent`` are dropped here, so their memory is freed on this thread, the last ones once
    the taking side stops."""
    stream = None
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for batch in batches:
                spent.clear()
                event = stream.record_event() if stream is not None else None
                if not _hand(handed, stop, (batch, event)):
                    return
        _hand(handed, stop, _END)
    except BaseException as e:   # raised again in the taking thread
        _hand(handed, stop, _Failed(e))
    finally:
        close = getattr(batches, "close", None)
        if close is not None:   # a generator backend releases its pool or pipeline here, on its thread
            close()
        stop.wait()
        spent.clear()


def _hand(handed: queue.Queue, stop: threading.Event, item) -> bool:
    """Put ``item`` unless the taking side has stopped; False when it has."""
    if stop.is_set():
        return False
    handed.put(item)
    return True


def _taken(batch: CropBatch, event: torch.cuda.Event | None, device: torch.device) -> CropBatch:
    if event is not None:
        stream = torch.cuda.current_stream(device)
        stream.wait_event(event)
        for view in batch.views:
            view.record_stream(stream)
    return batch


def _drain(handed: queue.Queue) -> None:
    while True:
        try:
            handed.get_nowait()
        except queue.Empty:
            return
