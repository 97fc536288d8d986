"""The one durable write (common/store/files.py) and the files the product writes through it."""
from __future__ import annotations

import dataclasses
import errno
import os

import pytest
import torch
from torch import nn

from mealv2.common.data.dataset import build_index, cache_file
from mealv2.common.models.checkpoints import save_checkpoint
from mealv2.common.store.files import make_folders, write_file
from mealv2.stage2_train.utils import METRICS, RunLog, write_run_config

from conftest import partial_of, record_fsyncs


def test_a_write_syncs_the_file_then_its_entry_and_each_new_folder_bottom_up(tmp_path, monkeypatch):
    target = tmp_path / "a" / "b" / "c" / "f"
    recorded = record_fsyncs(monkeypatch)
    write_file(target, b"bytes")
    synced = [path for path, _ in recorded]
    assert target.read_bytes() == b"bytes" and list(target.parent.iterdir()) == [target]
    folders_made = [str(tmp_path / "a" / "b"), str(tmp_path / "a"), str(tmp_path)]   # each new folder's parent
    assert synced[:3] == folders_made and partial_of(target).fullmatch(synced[3]) and synced[4:] == [str(target.parent)]


def test_making_folders_that_exist_syncs_nothing(tmp_path, monkeypatch):
    synced = record_fsyncs(monkeypatch)
    make_folders(tmp_path)
    make_folders(tmp_path / "new", fsync=False)
    assert synced == [] and (tmp_path / "new").is_dir()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def half_then_full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="No space left"):
        write_file(target, half_then_full)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_a_sole_writer_deletes_only_what_killed_writers_of_its_file_left(tmp_path):
    left = [tmp_path / name for name in ("f.123.456.partial", "f.bak.1.2.partial", "g.1.2.partial")]
    for path in left:
        path.write_bytes(b"?")
    write_file(tmp_path / "f", b"new")
    assert all(path.exists() for path in left)
    write_file(tmp_path / "f", b"newer", sole_writer=True)
    assert [path.exists() for path in left] == [False, True, True] and (tmp_path / "f").read_bytes() == b"newer"


@dataclasses.dataclass
class _Settings:
    lr: float = 0.1


def _checkpoint(run):
    save_checkpoint(run / "last.pt", model=nn.Linear(2, 3), arch="a", classes="abc", res=8, mean=[0.5] * 3,
                    std=[0.5] * 3, epoch=1)
    return run / "last.pt"


def _config(run):
    return write_run_config(run, _Settings(), {"res": [8]})


def _metrics(run):
    RunLog(run).write([{**dict.fromkeys(METRICS), "epoch": 0, "loss": 1.5}])
    return run / "metrics.csv"


@pytest.mark.parametrize("write", [_checkpoint, _config, _metrics])
def test_what_a_run_writes_is_durable(tmp_path, monkeypatch, write):
    synced = record_fsyncs(monkeypatch)
    path = write(tmp_path)
    synced = [p for p, _ in synced]
    assert any(partial_of(path).fullmatch(p) for p in synced) and str(tmp_path) in synced, synced
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name or ".tmp" in p.name] == []


def test_the_dataset_index_cache_is_durable(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MEALV2_CACHE", str(tmp_path / "cache"))
    synced = record_fsyncs(monkeypatch)
    build_index(tiny_data, cache=True, workers=1)
    path = cache_file(tiny_data, False)
    synced = [p for p, _ in synced]
    assert any(partial_of(path).fullmatch(p) for p in synced) and str(path.parent) in synced, synced
    assert str(tmp_path) in synced   # the cache folders were new: their entries too


def test_a_checkpoint_written_over_a_full_disk_keeps_the_old_one(tmp_path, monkeypatch):
    from mealv2.common.errors import MealV2Error

    path = _checkpoint(tmp_path)
    monkeypatch.setenv("MEALV2_DISK_FULL_AT", "checkpoint_bytes")
    with pytest.raises(MealV2Error, match=r"last.pt: cannot write the checkpoint \(No space left on device\).*"
                                          r"partial file was removed; the previous last.pt is intact"):
        _checkpoint(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert torch.load(path, weights_only=True)["epoch"] == 1
