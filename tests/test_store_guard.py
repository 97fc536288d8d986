"""A store's guard (its lease's check, lease.py) is checked before every write that commits, a resume's
included: a writer that lost its store writes nothing more (on disk here: the guard is any callable)."""
from __future__ import annotations

import numpy as np
import pytest
from test_store import N, _attrs, _shard_data

from mealv2.common.store.label_store import LabelStore, StoreError
from mealv2.common.store.schema import STAGED, chunk_key


def _lost():
    raise StoreError("lost its hold on the store")


def _files(path) -> dict:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def _labelled_round(tmp_path) -> LabelStore:
    """A store of 2 rounds whose round 0 is labelled but not packed (a run killed before packing)."""
    store = LabelStore.create_or_resume(tmp_path / "s.zarr", _attrs(), 2, np.arange(N) % 7)
    for s in range(store.num_shards):
        store.write_shard(0, s, *_shard_data(store, 0, s))
    return store


def test_a_resume_whose_lease_is_lost_repairs_packs_and_resizes_nothing(tmp_path):
    store = _labelled_round(tmp_path)
    (store.path / STAGED / chunk_key("probs", 4, 0, 1)).unlink()   # a lost chunk: repair would unmark its shard
    before = _files(store.path)
    with pytest.raises(StoreError, match="lost its hold"):   # would repair, pack round 0 and plan 3 rounds
        LabelStore.create_or_resume(store.path, _attrs(), 3, np.arange(N) % 7, guard=_lost)
    assert _files(store.path) == before


def test_the_staged_files_of_a_packed_round_are_deleted_only_while_the_lease_holds(tmp_path):
    store = _labelled_round(tmp_path)
    store.guard = lambda: store.packed()[0] and _lost()   # lost right after round 0 is committed
    with pytest.raises(StoreError, match="lost its hold"):
        store.pack()
    assert store.packed()[0] and list((store.path / STAGED / "probs" / "c" / "0").rglob("*"))


def test_a_writer_that_lost_its_lease_writes_no_data_of_a_shard_nor_its_run_record(tmp_path):
    store = LabelStore.create_or_resume(tmp_path / "s.zarr", _attrs(), 2, np.arange(N) % 7)
    before = _files(store.path)
    store.guard = _lost
    with pytest.raises(StoreError, match="lost its hold"):
        store.write_shard(0, 0, *_shard_data(store, 0, 0))
    with pytest.raises(StoreError, match="lost its hold"):
        store.record_run({"crops": 1})
    assert _files(store.path) == before
