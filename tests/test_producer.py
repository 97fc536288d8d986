"""The loaders' producer thread (loaders/producer.py): batches are made off the thread that takes
them, and the thread stops at the end, on an early stop, on an error in the taking loop and on
Ctrl-C, leaving none behind. (An error on the producer, named in the taking thread: test_torch_loader.)"""
import os
import signal
import threading
import time
import weakref

import numpy as np
import pytest
import torch

from conftest import make_image_dataset
from mealv2.common.data.crops import CropParams, sample_crops
from mealv2.common.data.dataset import build_index
from mealv2.common.data.loaders import torch as torch_loader
from mealv2.common.data.loaders.base import CropBatch, CropRequest, View
from mealv2.common.data.loaders.producer import produce
from mealv2.common.data.loaders.registry import iterate

VIEWS = [View(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))]
CPU = torch.device("cpu")


def producers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mealv2-loader"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 images, as 4 requests of 2 images x 2 crops."""
    index = build_index(make_image_dataset(tmp_path_factory.mktemp("d"), 2, 4))
    ids = np.arange(len(index))
    boxes, flips = sample_crops(0, 0, ids, index.sizes[ids], 2, CropParams(res=16))
    return index, [CropRequest(ids[a:a + 2], boxes[a:a + 2], flips[a:a + 2]) for a in range(0, len(ids), 2)]


def batches(name, index, requests, **options):
    return iterate(name, index, requests, VIEWS, 2, batch_size=2, device="cpu", threads=1, **options)


@pytest.mark.parametrize("name", ["torch", "dali"])
def test_every_loader_hands_over_its_batches_in_order_and_stops_at_the_end(data, name):
    index, requests = data
    got = list(batches(name, index, requests))
    assert [list(b.ids) for b in got] == [list(r.ids) for r in requests]
    assert not producers()


@pytest.mark.parametrize("decode_on", ["threads", "device"])
def test_the_crops_are_rendered_and_batched_off_the_thread_that_takes_them(data, monkeypatch, decode_on):
    index, requests = data
    rendering = []
    for name in ("render_crops", "render_batch", "on_device"):
        render = getattr(torch_loader, name)
        monkeypatch.setattr(torch_loader, name, lambda *a, render=render: rendering.append(
            threading.current_thread()) or render(*a))
    assert len(list(batches("torch", index, requests, decode_on=decode_on))) == len(requests)
    assert rendering and threading.current_thread() not in rendering


@pytest.mark.parametrize("how", ["close", "break"])
def test_a_taker_that_stops_early_stops_the_producer(data, how):
    index, requests = data
    taken = batches("torch", index, requests * 8)
    for _ in taken:
        break
    assert producers()   # still reading ahead
    if how == "close":
        taken.close()
    else:
        del taken   # a loop left with break: the iterator is dropped
    assert not producers()


def test_ctrl_c_while_waiting_for_a_batch_stops_the_producer():
    """SIGINT reaches the taking (main) thread while it waits on a slow producer: KeyboardInterrupt
    there, and the producer's source is closed on its own thread before the generator returns."""
    closed = []

    def slow():
        try:
            while True:
                time.sleep(0.3)
                yield CropBatch(ids=np.arange(1), views=[torch.zeros(1)], crcs=np.zeros(1, np.uint32))
        finally:
            closed.append(threading.current_thread())

    taken = produce(slow(), CPU, prefetch=2)
    next(taken)
    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        next(taken)
    timer.join()
    assert not producers() and closed and closed[0] is not threading.current_thread()


def test_an_error_in_the_taking_loop_stops_the_producer(data):
    index, requests = data
    with pytest.raises(RuntimeError, match="a failed step"):
        for _ in batches("torch", index, requests * 8):
            raise RuntimeError("a failed step")
    assert not producers()


def test_batches_the_taker_is_done_with_are_freed_on_the_producer():
    """Freeing a large batch of CPU tensors unmaps its memory: the thread that trains would pay
    for it (as much as for taking it, BENCHMARKS.md "Loader"). Only the batch the loop's variable
    holds at the end is freed by the taking thread."""
    freed = []

    def made():
        for _ in range(16):
            view = torch.zeros(4)
            weakref.finalize(view, lambda: freed.append(threading.current_thread()))
            yield CropBatch(ids=np.arange(1), views=[view], crcs=np.zeros(1, np.uint32))

    for batch in produce(made(), CPU, prefetch=2):
        time.sleep(0.01)   # a step: the producer runs ahead
    del batch
    assert len(freed) == 16
    assert freed.count(threading.current_thread()) <= 1, freed   # the one the loop's variable held
