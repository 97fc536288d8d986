"""Start-up at scale: the cached dataset index, its one build shared by ranks, the store verified
in shares by ranks, and the `bench startup` case (a CSV repeating paths, a complete store)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import time

import numpy as np
import pytest
import torch.multiprocessing as mp

from mealv2.common.data import dataset
from mealv2.common.data.dataset import DatasetIndex, build_index, build_index_shared, cache_file
from mealv2.common.models.distributed import DistInfo

from conftest import flip_chunk_byte


def _same(a: DatasetIndex, b: DatasetIndex) -> None:
    assert (a.root, a.relpaths, a.classes, a.skipped) == (b.root, b.relpaths, b.classes, b.skipped)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.sizes, b.sizes)
    assert a.labels.dtype == b.labels.dtype and a.sizes.dtype == b.sizes.dtype
    assert a.fingerprint == b.fingerprint


@pytest.fixture
def probes(monkeypatch, tmp_path):
    """Counts header probes; the index cache goes to a fresh folder."""
    monkeypatch.setenv("MEALV2_CACHE", str(tmp_path / "cache"))
    calls = []
    real = dataset._probe
    monkeypatch.setattr(dataset, "_probe", lambda p: calls.append(p) or real(p))
    return calls


def test_second_build_reads_the_cache_and_equals_an_uncached_build(tmp_path, tiny_data, probes):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    listing = sorted(p.relative_to(data) for p in data.rglob("*"))
    first = build_index(data, cache=True)
    assert len(probes) == len(first) == 12
    second = build_index(data, cache=True)
    assert len(probes) == 12            # no header read again
    _same(second, first)
    _same(second, build_index(data))
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == listing   # nothing written into DATA
    assert cache_file(data, False).parent == tmp_path / "cache" / "index"


@pytest.mark.parametrize("change", ["touch", "rename", "add", "rewrite"])
def test_a_changed_listing_rebuilds(tmp_path, tiny_data, probes, change):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    build_index(data, cache=True)
    probes.clear()
    f = data / "class_1" / "img_03.jpg"
    if change == "touch":
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    elif change == "rename":
        f.rename(data / "class_1" / "img_99.jpg")
    elif change == "add":
        shutil.copy(f, data / "class_2" / "img_50.jpg")
    else:   # same name, same mtime, other size: a file replaced by another one
        st = f.stat()
        shutil.copy(data / "class_0" / "img_03.jpg", f)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    rebuilt = build_index(data, cache=True)
    assert len(probes) == len(rebuilt)
    _same(rebuilt, build_index(data))


def test_a_damaged_cache_file_is_rebuilt_never_trusted(tmp_path, tiny_data, probes):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    good = build_index(data, cache=True)
    path = cache_file(data, False)
    raw = bytearray(path.read_bytes())
    for damage in (lambda b: b.__setitem__(len(b) // 2, b[len(b) // 2] ^ 1), lambda b: b.__delitem__(slice(100, None))):
        damage(raw)
        path.write_bytes(raw)
        probes.clear()
        _same(build_index(data, cache=True), good)
        assert len(probes) == len(good)
        raw = bytearray(path.read_bytes())   # rewritten whole


def test_skip_bad_is_part_of_the_key_and_its_skipped_files_are_kept(tmp_path, tiny_data, probes):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    (data / "class_0" / "img_03.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(dataset.BadImagesError):
        build_index(data, cache=True)
    first = build_index(data, skip_bad=True, cache=True)
    probes.clear()
    cached = build_index(data, skip_bad=True, cache=True)
    assert probes == [] and cached.skipped == first.skipped and len(cached.skipped) == 1
    with pytest.raises(dataset.BadImagesError):      # the skip_bad index is not used without skip_bad
        build_index(data, cache=True)


def test_an_unwritable_cache_folder_warns_and_still_indexes(tmp_path, tiny_data, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MEALV2_CACHE", str(blocker))    # a file where the folder should be
    _same(build_index(tiny_data, cache=True), build_index(tiny_data))
    assert "cannot write the dataset index cache" in capsys.readouterr().err


def test_the_bench_case_repeats_paths_and_its_store_matches_the_index(tmp_path, probes):
    from mealv2.benchmarks.startup import make_case
    from mealv2.stage2_train.config import TrainConfig
    from mealv2.stage2_train.modes import open_store
    from mealv2.stage2_train.replay import check_store_matches

    csv, store_path, expected = make_case(tmp_path / "case", images=700, files=5, rounds=2, crops=2, k=3,
                                          shard_size=256)
    index = build_index(csv, cache=True)
    assert len(index) == 700 and len(set(index.relpaths)) == 700      # one row per path (no CSV repeats)
    assert len({(csv.parent / p).resolve() for p in index.relpaths}) == 5
    _same(index, expected)
    store = open_store(TrainConfig(data=str(csv), out=str(tmp_path / "run"), arch="test_resnet",
                                   labels=str(store_path)))
    check_store_matches(store, index, str(csv))
    assert store.complete and store.read_round(1).ids.shape == (700, 2, 3)


# ---- two ranks (gloo) ------------------------------------------------------------------------------

def _rank(rank: int, world: int, port: int, csv: str, store: str, out: str, cache: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), MEALV2_CACHE=cache)
    from mealv2.common.models.distributed import distributed
    from mealv2.common.errors import MealV2Error
    from mealv2.common.store.label_store import LabelStore
    from mealv2.stage2_train.config import TrainConfig
    from mealv2.stage2_train.modes import open_store

    probed, checked = [], []
    real_probe, real_check = dataset._probe, LabelStore._check_chunk
    dataset._probe = lambda p: probed.append(p) or real_probe(p)
    LabelStore._check_chunk = lambda self, key, inner=None: checked.append([key, inner]) or real_check(self, key, inner)
    with distributed("cpu") as (info, _):
        index = build_index_shared(csv, info, progress=True)
        if rank == 0:
            time.sleep(0.5)   # rank 1 must not have gone ahead and probed meanwhile
        try:
            open_store(TrainConfig(data=csv, out=out, arch="test_resnet", labels=store), info)
            error = None
        except MealV2Error as e:
            error = str(e)
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump({"probed": len(probed), "fingerprint": index.fingerprint, "n": len(index),
                   "checked": checked, "error": error}, f)


@pytest.mark.slow
def test_two_ranks_share_one_index_build_and_verify_the_store_in_shares(tmp_path):
    from mealv2.benchmarks.startup import make_case
    csv, store, expected = make_case(tmp_path / "case", images=1500, files=6, rounds=1, crops=2, k=3,
                                     shard_size=256)    # 6 shards: rank 0 checks 0, 2, 4, rank 1 checks 1, 3, 5
    for shard in (3, 4):                                  # one damaged chunk in each rank's share
        flip_chunk_byte(store, "probs", 0, shard, mask=0x40)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "run")
    mp.spawn(_rank, args=(2, port, str(csv), str(store), out, str(tmp_path / "cache")), nprocs=2)
    r0, r1 = (json.loads(open(f"{out}.{rank}.json").read()) for rank in (0, 1))
    assert (r0["probed"], r1["probed"]) == (1500, 0)      # one build, rank 1 loaded it
    assert r0["fingerprint"] == r1["fingerprint"] == expected.fingerprint and r1["n"] == 1500
    shard_of = lambda c: c[1] if c[1] is not None else int(c[0].split("/")[2])  # noqa: E731  (the packed chunk's)
    assert {shard_of(c) for c in r0["checked"] if not c[0].startswith("labels")} == {0, 2, 4}
    assert {shard_of(c) for c in r1["checked"]} == {1, 3, 5}
    for r in (r0, r1):   # both refuse, naming both ranks' damaged chunks
        assert "probs/c/0/0/0/0[3]: unreadable chunk" in r["error"], r["error"]
        assert "probs/c/0/0/0/0[4]: unreadable chunk" in r["error"], r["error"]


def test_one_process_shares_with_itself(tmp_path, tiny_data, probes):
    _same(build_index_shared(tiny_data, DistInfo()), build_index(tiny_data))
    assert len(probes) == 24 and cache_file(tiny_data, False).is_file()
