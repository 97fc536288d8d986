"""The labeller's background shard writer: it overlaps the teachers, holds at most its depth of
shards, and a failure in its thread stops `mealv2 label` with the store and shard named.
(Kills at every writing moment, and resumes after them: tests/test_faults.py.)"""
from __future__ import annotations

import errno
import threading

import numpy as np
import pytest
import timm
import torch

from conftest import make_image_dataset
from mealv2.benchmarks.label import synthetic_store_attrs
from mealv2.common.data.crops import CropParams
from mealv2.common.store.label_store import LabelStore
from mealv2.common.models.teachers import Ensemble
from mealv2.common.store.writer import ShardWriter

WAIT = 20   # seconds a test waits for something that happens at once when the code is right


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("writer")
    data = make_image_dataset(root / "data", num_classes=3, per_class=4, seed=5)
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), root / "t.pth")
    return data, f"test_resnet={root / 't.pth'}@32"


def label(data, teacher, out, monkeypatch, capsys) -> tuple[int, str]:
    """`mealv2 label` in this process (so its store can be patched); (exit code, stderr).
    12 images in 6 shards of 2, one batch (2 images x 2 crops) per shard."""
    from mealv2.cli import main

    monkeypatch.setattr("sys.argv", ["mealv2", "label", str(data), "-t", teacher, "-o", str(out), "--rounds", "1",
                                     "--crops-per-image", "2", "--res", "32", "--topk", "2", "--shard-size", "2",
                                     "--batch-size", "4", "--workers", "1", "--device", "cpu", "--no-teacher-check"])
    try:
        main()
    except SystemExit as e:
        return e.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def count_forwards(monkeypatch) -> list[int]:
    calls = [0]
    real = Ensemble.probs

    def probs(self, views):
        calls[0] += 1
        return real(self, views)

    monkeypatch.setattr(Ensemble, "probs", probs)
    return calls


def test_the_teachers_go_on_while_a_shard_is_being_written(setup, tmp_path, monkeypatch, capsys, one_torch_thread):
    """The first shard's write waits until the teachers have labelled the next batch: a labeller
    that wrote in its own loop would never get there."""
    data, teacher = setup
    forwards = count_forwards(monkeypatch)
    real_write = LabelStore.write_shard
    overlapped = []

    def slow_write(self, round_, shard, *arrays, **names):
        if shard == 0:
            seen = forwards[0]
            for _ in range(WAIT * 100):
                if forwards[0] > seen:
                    break
                threading.Event().wait(0.01)
            overlapped.append(forwards[0] > seen)
        real_write(self, round_, shard, *arrays, **names)

    monkeypatch.setattr(LabelStore, "write_shard", slow_write)
    code, err = label(data, teacher, tmp_path / "s.zarr", monkeypatch, capsys)
    assert code == 0, err
    assert overlapped == [True], "the labeller waited for the first shard's write"
    assert LabelStore.open(tmp_path / "s.zarr").complete


def test_a_write_failing_in_the_writer_thread_stops_label_naming_the_store_and_shard(setup, tmp_path, monkeypatch,
                                                                                     capsys, one_torch_thread):
    data, teacher = setup
    out = tmp_path / "s.zarr"
    forwards = count_forwards(monkeypatch)
    failed_in = []

    def full_disk(self, round_, shard, *arrays, **names):
        failed_in.append(threading.current_thread().name)
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "probs" / "c" / "0" / str(shard)))

    monkeypatch.setattr(LabelStore, "write_shard", full_disk)
    code, err = label(data, teacher, out, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert f"{out}: writing round 0 shard 0 (images 0-1) failed: No space left on device ({out}/probs/c/0/0)" in err
    assert "re-run the same `mealv2 label` command" in err
    assert failed_in[0] != threading.main_thread().name
    assert forwards[0] < 6, "the labeller labelled every shard after its writer had failed"
    assert not LabelStore.open(out).done_mask().any()


def test_at_most_depth_shards_are_in_flight(tmp_path):
    """With ``depth`` shards being written or waiting, handing over one more blocks until one is done."""
    attrs = synthetic_store_attrs(["a", "b", "c"], 2, 1, 1, CropParams(res=32), num_images=4)
    store = LabelStore.create_or_resume(tmp_path / "s.zarr", attrs, 1, np.zeros(4, np.int32))
    release, written = threading.Event(), []
    store.write_shard = lambda r, s, *a, **names: (release.wait(WAIT), written.append(s))
    handed = []
    shard = (np.zeros((1, 1, 4), np.uint16), np.zeros((1, 1), np.uint8), np.zeros((1, 1, 2), np.uint16),
             np.zeros((1, 1, 3), np.uint8), np.zeros(1, np.uint32))

    def hand_over(writer):
        for s in range(4):
            writer.submit(0, s, *shard)
            handed.append(s)

    with ShardWriter(store, depth=2) as writer:
        producer = threading.Thread(target=hand_over, args=(writer,))
        producer.start()
        producer.join(timeout=1.0)
        assert producer.is_alive() and handed == [0, 1], "a third shard was taken while two were in flight"
        release.set()
        producer.join(WAIT)
    assert handed == written == [0, 1, 2, 3]
