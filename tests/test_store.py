"""The label store's schema and rules, through the LabelStore API (no teachers, no images)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from filelock import FileLock

from mealv2.common.errors import MealV2Error
from mealv2.common.store.label_store import LabelStore, StoreError, acquire_writer_lock
from mealv2.common.store.schema import ADDED_MARKS, ARRAYS_KEY, DIGEST_KEY, FORMAT, REQUIRED_ARRAYS, VERSION, chunk_key
from mealv2.common.data.targets import PROB_LEVELS

from conftest import flip_chunk_byte, partial_of, record_fsyncs

N, C, K, SHARD = 10, 3, 4, 4        # 3 shards: [0, 4), [4, 8), [8, 10)


def _attrs(**over) -> dict:
    a = {"classes": [f"c{i}" for i in range(7)], "topk": K, "temperature": 1.0, "seed": 0,
         "crops_per_image": C, "shard_size": SHARD,
         "crop": {"res": 32, "scale": [0.08, 1.0], "ratio": [0.75, 1.333], "flip_prob": 0.5,
                  "interpolation": "bilinear"},
         "teachers": [{"spec": "t1", "arch": "a", "sha256": "0" * 64, "res": 32, "mean": [0.5] * 3,
                       "std": [0.5] * 3, "weight": 1.0}],
         "teacher_precision": "fp32", "dataset": {"num_images": N, "fingerprint": "f" * 64, "skipped": []}}
    a.update(over)
    return a


def _shard_data(store: LabelStore, r: int, s: int, seed: int = 0):
    a, b = store.shard_range(s)
    rng = np.random.default_rng([seed, r, s])
    n = b - a
    boxes = rng.integers(0, 512, (n, C, 4)).astype(np.uint16)
    flips = rng.integers(0, 2, (n, C)).astype(np.uint8)
    ids = np.stack([rng.permutation(7)[:K] for _ in range(n * C)]).reshape(n, C, K).astype(np.uint16)
    probs = rng.integers(0, PROB_LEVELS + 1, (n, C, K + 1)).astype(np.uint8)
    return boxes, flips, ids, probs, image_crcs(a, b)


def image_crcs(a: int, b: int) -> np.ndarray:
    """Stand-ins for the CRC32C of images a..b-1 (the same in every round)."""
    return (np.arange(a, b, dtype=np.uint32) * 2654435761) & 0xFFFFFFFF


def _fill(store: LabelStore, rounds=None, pack=True):
    """Label ``rounds`` (default all) and pack them, as `mealv2 label` does."""
    for r in range(store.rounds_planned) if rounds is None else rounds:
        for s in range(store.num_shards):
            store.write_shard(r, s, *_shard_data(store, r, s))
    if pack:
        store.pack()


@pytest.fixture
def store(tmp_path) -> LabelStore:
    return LabelStore.create_or_resume(tmp_path / "s", _attrs(), 2, np.arange(N) % 7)


def test_schema_arrays_chunks_and_codecs(store):
    g = zarr.open_group(store.path, mode="r")
    expect = {"boxes": ((2, N, C, 4), "uint16", (1, SHARD, C, 4)),
              "flips": ((2, N, C), "uint8", (1, SHARD, C)),
              "ids": ((2, N, C, K), "uint16", (1, SHARD, C, K)),
              "probs": ((2, N, C, K + 1), "uint8", (1, SHARD, C, K + 1)),
              "done": ((2, 3), "uint8", (1, 1)),
              "crc32c": ((N,), "uint32", (SHARD,)),
              "labels": ((N,), "int32", (N,))}
    for name, (shape, dtype, chunks) in expect.items():
        for where in ("", "staged/") if name != "labels" else ("",):
            arr = g[where + name]
            assert (arr.shape, str(arr.dtype), arr.chunks) == (shape, dtype, chunks), where + name
            meta = json.loads((store.path / where / name / "zarr.json").read_text())
            codecs = meta["codecs"]
            if where == "" and name != "labels":   # packed: one object per round, the shards its inner chunks
                assert arr.shards == ((1, 3 * SHARD, *shape[2:]) if len(shape) > 2 else
                                      (1, 3) if name == "done" else (3 * SHARD,)), name
                assert meta["codecs"][-1]["configuration"]["index_codecs"][-1]["name"] == "crc32c", name
                codecs = meta["codecs"][-1]["configuration"]["codecs"]
            assert codecs[-1]["name"] == "crc32c", where + name     # every chunk is checksummed
            assert meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
    a = g.attrs["mealv2"]
    assert (a["format"], a["version"], a["prob_levels"]) == (FORMAT, VERSION, PROB_LEVELS)
    assert a["rounds_planned"] == 2
    np.testing.assert_array_equal(g["labels"][:], np.arange(N) % 7)


def test_shards_round_trip_and_are_marked_done(store):
    assert not store.done_mask().any() and store.rounds_complete() == 0 and not store.complete
    data = _shard_data(store, 1, 2)
    store.write_shard(1, 2, *data)
    assert store.done_mask().tolist() == [[False] * 3, [False, False, True]]
    assert (store.path / "staged/done/c/1/2").is_file()
    g = zarr.open_group(store.path, mode="r")
    for name, values in zip(("boxes", "flips", "ids", "probs"), data):
        np.testing.assert_array_equal(g["staged/" + name][1, 8:10], values)
        assert (store.path / chunk_key("staged/" + name, g[name].ndim, 1, 2)).is_file()
    _fill(store, pack=False)
    assert store.done_mask().all() and store.rounds_complete() == 0   # labelled, not yet packed
    assert store.pack() == [0, 1] and store.pack() == []
    assert store.rounds_complete() == 2 and store.complete
    # packed: one object per array and round, the staged files gone; plain zarr reads the same values
    files = sorted(str(f.relative_to(store.path)) for f in store.path.rglob("*") if f.is_file()
                   and f.name != "zarr.json")
    assert files == sorted([f"{name}/c/{r}/0/0/0" for name in ("boxes", "ids", "probs") for r in (0, 1)]
                           + [f"flips/c/{r}/0/0" for r in (0, 1)] + ["done/c/0/0", "done/c/1/0", "crc32c/c/0",
                                                                      "labels/c/0"]), files
    np.testing.assert_array_equal(g["crc32c"][:], image_crcs(0, N))
    assert g["done"][:].all()
    r = store.read_round(1)
    for s in range(3):
        a, b = store.shard_range(s)
        for got, want in zip((r.boxes, r.flips, r.ids, r.probs), _shard_data(store, 1, s)[:4]):
            np.testing.assert_array_equal(got[a:b], want)
    assert r.nbytes == r.boxes.nbytes + r.flips.nbytes + r.ids.nbytes + r.probs.nbytes


def test_a_shard_of_fill_values_still_has_all_its_chunk_files(store):
    # zarr skips writing chunks equal to the fill value; a done shard must not be missing files,
    # or a deleted file could not be told from an unwritten one.
    boxes, flips, ids, probs, crcs = _shard_data(store, 0, 0)
    store.write_shard(0, 0, boxes, np.zeros_like(flips), np.zeros_like(ids), probs, np.zeros_like(crcs))
    assert store.verify() != [] and all("not complete" in p for p in store.verify())
    for s in (1, 2):
        store.write_shard(0, s, *_shard_data(store, 0, s))
    store.pack()
    assert store.missing_chunks(0) == [] and store.rounds_complete() == 1
    assert store._check_chunk(chunk_key("flips", 3, 0, 0), 0) is None   # the packed object holds it too


def test_rounds_complete_counts_leading_full_rounds(store):
    _fill(store, rounds=[1])
    assert store.rounds_complete() == 0
    with pytest.raises(StoreError, match="round 0 is not complete"):
        store.read_round(0)
    _fill(store, rounds=[0])
    assert store.rounds_complete() == 2


def test_resume_with_the_same_settings_keeps_the_data(store):
    _fill(store, rounds=[0])
    again = LabelStore.create_or_resume(store.path, _attrs(), 2, np.arange(N) % 7)
    assert again.done_mask()[0].all() and not again.done_mask()[1].any()
    np.testing.assert_array_equal(again.read_round(0).ids, store.read_round(0).ids)


@pytest.mark.parametrize("key,value,named", [
    ("classes", [f"k{i}" for i in range(7)], "classes"),
    ("topk", 3, "topk: store has 4, this run has 3"),
    ("temperature", 2.0, "temperature: store has 1.0, this run has 2.0"),
    ("seed", 5, "seed: store has 0, this run has 5"),
    ("crops_per_image", 2, "crops_per_image: store has 3, this run has 2"),
    ("shard_size", 5, "shard_size: store has 4, this run has 5"),
    ("crop", {**_attrs()["crop"], "res": 64}, "crop.res: store has 32, this run has 64"),
    ("crop", {**_attrs()["crop"], "scale": [0.5, 1.0]}, "crop.scale: store has [0.08, 1.0], this run has [0.5, 1.0]"),
    ("teachers", [{**_attrs()["teachers"][0], "spec": "t2", "sha256": "1" * 64}], "teachers[0].sha256"),
    ("teachers", _attrs()["teachers"] * 2, "teachers: store has 1 teacher(s) [t1], this run has 2 teacher(s) [t1, t1]"),
    ("dataset", {"num_images": N, "fingerprint": "e" * 64, "skipped": []}, "dataset.fingerprint: store has"),
])
def test_other_settings_are_refused_naming_both_values(store, key, value, named):
    _fill(store, rounds=[0])
    with pytest.raises(StoreError) as e:
        LabelStore.create_or_resume(store.path, _attrs(**{key: value}), 2, np.arange(N) % 7)
    assert named in str(e.value) and str(store.path) in str(e.value)
    # nothing was changed by the refused attempt
    assert LabelStore.open(store.path).attrs == store.attrs


def test_fewer_rounds_than_complete_are_refused_and_the_plan_shrinks_to_the_complete_ones(store):
    _fill(store, rounds=[0])
    with pytest.raises(StoreError, match="plans 2 rounds, --rounds 0 would drop some of its 1 complete"):
        LabelStore.create_or_resume(store.path, _attrs(), 0, np.arange(N) % 7)
    shrunk = LabelStore.create_or_resume(store.path, _attrs(), 1, np.arange(N) % 7)
    assert shrunk.rounds_planned == 1 and shrunk.complete
    assert LabelStore.open(store.path).rounds_planned == 1 and shrunk.done_mask().shape == (1, 3)


def test_more_rounds_append_and_keep_the_done_rounds(store):
    _fill(store)
    before = store.read_round(1)
    grown = LabelStore.create_or_resume(store.path, _attrs(), 4, np.arange(N) % 7)
    assert grown.rounds_planned == 4 and grown.rounds_complete() == 2 and not grown.complete
    assert zarr.open_group(store.path, mode="r")["ids"].shape == (4, N, C, K)
    assert grown.done_mask().shape == (4, 3)
    np.testing.assert_array_equal(grown.read_round(1).probs, before.probs)
    _fill(grown, rounds=[2, 3])
    reopened = LabelStore.open(store.path)      # digest updated with rounds_planned
    assert reopened.complete and reopened.rounds_planned == 4


def test_edited_attributes_are_detected(store):
    meta_path = store.path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["mealv2"]["temperature"] = 0.5
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="edited after the store was made"):
        LabelStore.open(store.path)


def test_other_format_versions_are_refused_naming_both(store):
    meta_path = store.path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["mealv2"]["version"] = VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=f"v{VERSION + 1}, this mealv2 reads {FORMAT} v{VERSION}"):
        LabelStore.open(store.path)


def test_a_new_store_is_never_made_over_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MealV2Error, match=r"out is not empty and not a label store \(no zarr.json; it holds notes.txt\)"):
        LabelStore.create_or_resume(out, _attrs(), 2, np.arange(N) % 7)
    assert [f.name for f in out.iterdir()] == ["notes.txt"] and not out.with_name("out.creating").exists()


def test_not_a_store_is_refused(tmp_path):
    with pytest.raises(StoreError, match="not a label store"):
        LabelStore.open(tmp_path)
    zarr.open_group(tmp_path / "plain", mode="w")
    with pytest.raises(StoreError, match="unreadable label store metadata"):
        LabelStore.open(tmp_path / "plain")


def test_verify_finds_flipped_bytes_missing_files_and_incomplete_shards(store):
    _fill(store, rounds=[0])              # round 0 packed
    _fill(store, rounds=[1], pack=False)  # round 1 labelled, staged
    assert store.verify() == ["round 1: every shard labelled, not packed; re-run the store's `mealv2 label` command"]
    flip_chunk_byte(store.path, "probs", 0, 1)
    (store.path / chunk_key("staged/boxes", 4, 1, 2)).unlink()
    zarr.open_group(store.path, mode="r+")["staged/done"][1, 0] = 0
    problems = store.verify()
    assert any(p.startswith("probs/c/0/0/0/0[1]: unreadable chunk (its CRC32C") for p in problems), problems
    assert any(p.startswith("staged/boxes/c/1/2/0/0: missing chunk file") for p in problems), problems
    assert any(p.startswith("round 1 shard 0: not complete") for p in problems), problems
    assert len(problems) == 3
    index = store.path / chunk_key("ids", 4, 0, 0)   # an object's index is checked too
    index.write_bytes(index.read_bytes()[:-1] + b"\0")
    assert [p for p in store.verify([2]) if p.startswith("ids")] == [
        "ids/c/0/0/0/0[2]: unreadable object (its index's CRC32C does not match: the file is damaged)"]


def test_image_crcs_are_kept_and_an_image_changed_between_rounds_is_refused(store):
    _fill(store, rounds=[0])
    np.testing.assert_array_equal(store.crcs(), image_crcs(0, N))
    boxes, flips, ids, probs, crcs = _shard_data(store, 1, 1)
    crcs[2] ^= 1   # image 6 re-encoded after round 0 was labelled
    with pytest.raises(StoreError, match=r"1 image\(s\) changed since earlier rounds.*image 6"):
        store.write_shard(1, 1, boxes, flips, ids, probs, crcs)
    assert not store.done_mask()[1, 1]
    np.testing.assert_array_equal(store.crcs(), image_crcs(0, N))


def test_remove_partial_writes(store):
    (store.path / "ids" / "c").mkdir(parents=True, exist_ok=True)
    stale = store.path / "ids" / "c" / "0.1234.partial"
    stale.write_bytes(b"x")
    assert store.remove_partial_writes() == 1 and not stale.exists()


def test_data_bytes_counts_chunk_files_only(store):
    assert store.data_bytes() == 0
    _fill(store)
    chunks = sum(f.stat().st_size for n in ("boxes", "flips", "ids", "probs")
                 for f in (store.path / n / "c").rglob("*") if f.is_file())
    assert store.data_bytes() == chunks > 0
    assert store.bytes_on_disk() > chunks


def test_a_second_writer_is_refused_and_the_lock_dies_with_its_holder(tmp_path):
    path = tmp_path / "s"
    lock = acquire_writer_lock(path)
    with pytest.raises(StoreError, match="being written by another"):
        acquire_writer_lock(path)
    lock.release()
    acquire_writer_lock(path).release()
    # a holder killed with SIGKILL leaves no stale lock
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from filelock import FileLock; "
                               f"l = FileLock({str(path) + '.lock'!r}); l.acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError):
            acquire_writer_lock(path)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    deadline = time.monotonic() + 5
    while True:
        try:
            acquire_writer_lock(path).release()
            break
        except StoreError:
            assert time.monotonic() < deadline, "lock not released by the killed holder"
            time.sleep(0.05)
    assert FileLock(str(path) + ".lock").lock_file.endswith("s.lock")


def test_digest_covers_the_mealv2_attributes(store):
    meta = json.loads((store.path / "zarr.json").read_text())["attributes"]
    assert set(meta) == {"mealv2", DIGEST_KEY, ARRAYS_KEY}
    assert len(meta[DIGEST_KEY]) == 64
    arrays = {str(p.parent.relative_to(store.path)) for p in store.path.rglob("*/zarr.json")} - {"staged"}
    assert set(meta[ARRAYS_KEY]) == set(REQUIRED_ARRAYS) == arrays


def test_the_paths_array_is_covered_too(tmp_path):
    """A store made with its images' paths (what `label` makes) has their array's metadata in the checksums."""
    store = LabelStore.create_or_resume(tmp_path / "s", _attrs(), 2, np.arange(N) % 7,
                                        relpaths=[f"c/{i}.jpg" for i in range(N)])
    assert "paths" in json.loads((store.path / "zarr.json").read_text())["attributes"][ARRAYS_KEY]
    _edit_array_meta(store.path, "paths", lambda m: m.update(fill_value=1))
    with pytest.raises(StoreError, match=r"array 'paths''s metadata .*was changed after the store was made"):
        LabelStore.open(store.path)


def _edit_array_meta(path, name, edit) -> None:
    file = path / name / "zarr.json"
    meta = json.loads(file.read_text())
    edit(meta)
    file.write_text(json.dumps(meta, indent=2))


@pytest.mark.parametrize("name,edit", [
    ("probs", lambda m: m["codecs"][0]["configuration"].update(order=[0, 3, 2, 1])),   # the repro
    ("ids", lambda m: m["codecs"][0]["configuration"].update(order=[0, 1, 2, 3])),
    ("boxes", lambda m: m.update(shape=[2, N + 4, C, 4])),
    ("probs", lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[1, 2, C, K + 1])),
    ("flips", lambda m: m.update(data_type="int8")),
    ("labels", lambda m: m.update(fill_value=3)),
    ("crc32c", lambda m: m["codecs"].pop()),
])
def test_edited_array_metadata_is_refused_naming_the_file(store, name, edit):
    """Once only the group's attributes had a SHA-256: a permuted transpose order replayed permuted labels."""
    _fill(store)
    _edit_array_meta(store.path, name, edit)
    with pytest.raises(StoreError, match=rf"{store.path / name / 'zarr.json'}: array '{name}''s metadata .*was "
                                         rf"changed after the store was made"):
        LabelStore.open(store.path)


def test_fewer_rounds_in_an_array_than_planned_is_refused(store):
    _edit_array_meta(store.path, "done", lambda m: m.update(shape=[1, *m["shape"][1:]]))
    with pytest.raises(StoreError, match=r"array 'done' holds 1 rounds, the store plans 2"):
        LabelStore.open(store.path)


@pytest.mark.parametrize("damage,says", [
    (lambda f: f.unlink(), "is missing: array 'probs' has no metadata"),
    (lambda f: f.write_text(f.read_text()[:40]), "is damaged (not JSON"),
    (lambda f: f.write_text("[]"), "is damaged (no array shape in it)"),
])
def test_missing_or_damaged_array_metadata_is_a_clear_error(store, damage, says):
    """Once a raw JSONDecodeError or KeyError."""
    damage(store.path / "probs" / "zarr.json")
    with pytest.raises(StoreError, match=re.escape(f"{store.path / 'probs' / 'zarr.json'} {says}")):
        LabelStore.open(store.path)


def test_whitespace_and_an_interrupted_append_keep_the_metadata_valid(store):
    for name in REQUIRED_ARRAYS:   # the same content, other bytes: nothing that shapes a label changed
        _edit_array_meta(store.path, name, lambda m: None)
    assert LabelStore.open(store.path).rounds_planned == 2
    store.group["boxes"].resize((3, N, C, 4))   # an append killed after its first resize
    assert LabelStore.open(store.path).rounds_planned == 2
    grown = LabelStore.create_or_resume(store.path, _attrs(), 3, np.arange(N) % 7)
    assert grown.rounds_planned == 3 and LabelStore.open(store.path).group["probs"].shape[0] == 3


def test_verify_checks_only_the_shards_asked_and_shares_cover_the_store(store):
    _fill(store)
    flip_chunk_byte(store.path, "ids", 1, 2)
    assert store.verify([0, 1]) == []
    assert store.verify([2]) == ["ids/c/1/0/0/0[2]: unreadable chunk (its CRC32C does not match its bytes: the file "
                                 "is damaged)"]
    shares = [store.verify(range(rank, store.num_shards, 2)) for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(store.verify())
    np.testing.assert_array_equal(store.done_mask([2, 0]), store.done_mask()[:, [2, 0]])


def test_every_chunk_file_and_folder_of_a_shard_is_fsynced_before_its_done_mark(store, monkeypatch):
    """Durability: after a power loss a shard marked done must have its data (a commit record)."""
    mark = store.path / chunk_key("staged/done", 2, 1, 2)
    _fill(store, rounds=[0])
    synced = record_fsyncs(monkeypatch, mark.exists)   # (path, was the shard's done mark already written?)
    keys = [chunk_key("staged/" + name, ndim, 1, 2) for name, ndim in
            (("boxes", 4), ("flips", 3), ("ids", 4), ("probs", 4))]   # crc32c: packed with round 0
    existed = {str(p) for p in store.path.rglob("*") if p.is_dir()}
    store.write_shard(1, 2, *_shard_data(store, 1, 2))
    before = {path for path, marked in synced if not marked}
    for key in keys:
        assert str(store.path / key) in before, key   # the file
        folder = (store.path / key).parent
        assert str(folder) in before, key             # the entry zarr renamed it to
        while str(folder) not in existed:             # and the entries of folders made for it
            assert str(folder.parent) in before, folder
            folder = folder.parent
    assert "boxes/c/1/2" in " ".join(before) and mark.exists()   # round 1 shard 2's folders were new


def test_packing_makes_each_new_folder_durable_up_to_one_that_existed(store, monkeypatch):
    """A power cut after a round's commit must not lose the new folders above its objects (`boxes/c/1`
    ...): packing synced each object's own folder only (issue 28)."""
    _fill(store, rounds=[0])
    _fill(store, rounds=[1], pack=False)
    commit = store.path / chunk_key("done", 2, 1, 0)
    existed = {p for p in store.path.rglob("*") if p.is_dir()}
    synced = record_fsyncs(monkeypatch, commit.exists)   # (path, was the round committed?)
    assert store.pack() == [1]
    before_commit = {path for path, committed in synced if not committed}
    objects = [store.path / chunk_key(name, ndim, 1, 0) for name, ndim in
               (("boxes", 4), ("flips", 3), ("ids", 4), ("probs", 4))]
    for new in {p for p in store.path.rglob("*") if p.is_dir()} - existed:
        assert str(new.parent) in {path for path, _ in synced}, new
        if new not in commit.parents:
            assert str(new.parent) in before_commit, new
    for f in objects:
        assert str(f.parent) in before_commit and any(partial_of(f).fullmatch(path) for path in before_commit), f
    assert {str(commit), str(commit.parent)} <= {path for path, _ in synced}
    assert str(store.path / "boxes" / "c") in before_commit   # boxes/c/1 was new


def test_metadata_rewritten_in_place_is_made_durable(store, monkeypatch):
    """A plan grown, a layer added or a run recorded rewrites a zarr.json; zarr renames the new file into
    place and syncs nothing, so a power cut could take back what the arrays already hold."""
    _fill(store)
    synced = record_fsyncs(monkeypatch)

    def made_durable(*names: str) -> bool:
        paths = {path for path, _ in synced}
        files = [store.path / name / "zarr.json" for name in names]
        return all({str(f), str(f.parent)} <= paths for f in files)

    grown = LabelStore.create_or_resume(store.path, _attrs(), 3, np.arange(N) % 7)
    assert grown.rounds_planned == 3 and made_durable("", "boxes", "probs", "done", "staged/done")
    synced.clear()
    grown.add_layer({"teacher": _attrs()["teachers"][0], "marks": ADDED_MARKS})
    assert made_durable("", "teachers/0/probs", "teachers/0/done", "staged/teachers/0/probs")
    synced.clear()
    grown.record_run({"crops": 1})
    assert made_durable("")


def test_a_new_store_is_durable_before_it_appears_under_its_name(tmp_path, monkeypatch):
    """Every file and folder of a new store synced before the rename that publishes it, then the rename
    itself (issue 28), and the folders made for it."""
    out = tmp_path / "new" / "deeper" / "s"
    synced = record_fsyncs(monkeypatch, out.exists)   # (path, was the store visible?)
    LabelStore.create_or_resume(out, _attrs(), 2, np.arange(N) % 7, relpaths=[f"{i}.jpg" for i in range(N)])
    hidden = {path for path, visible in synced if not visible}
    built = out.with_name(out.name + ".creating")
    assert not built.exists()
    for path in (out, *out.rglob("*")):
        assert str(built / path.relative_to(out)) in hidden, path
    assert (str(out.parent), True) in synced
    assert {str(tmp_path), str(tmp_path / "new")} <= hidden


def test_fsync_can_be_turned_off_for_measuring(store, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fsync", calls.append)
    store.fsync = False
    _fill(store, rounds=[0])
    assert calls == [] and store.done_mask()[0].all()


def _round_arrays(store, r):
    rd = store.read_round(r)
    return rd.boxes, rd.flips, rd.ids, rd.probs


def test_a_damaged_chunk_of_a_packed_round_redoes_only_its_shard(store):
    _fill(store)
    want = [_round_arrays(store, r) for r in (0, 1)]
    flip_chunk_byte(store.path, "probs", 1, 1)
    again = LabelStore.create_or_resume(store.path, _attrs(), 2, np.arange(N) % 7)
    assert again.repairs == ["probs/c/1/0/0/0[1]: damaged or missing; shard 1 of round(s) 1 will be labelled again"]
    # round 1 unpacked: its sound shards staged again from the object, the damaged one to be labelled
    assert again.done_mask().tolist() == [[True] * 3, [True, False, True]] and again.rounds_complete() == 1
    assert again.verify() == ["round 1 shard 1: not complete (staged/done/c/1/1 unset)"]
    again.write_shard(1, 1, *_shard_data(store, 1, 1))
    assert again.pack() == [1] and again.verify() == []
    assert [f for f in (store.path / "staged").rglob("*") if f.is_file() and f.name != "zarr.json"] == []
    for r in (0, 1):
        for got, expected in zip(_round_arrays(again, r), want[r]):
            np.testing.assert_array_equal(got, expected)


def test_damaged_image_crcs_of_a_packed_store_redo_their_shard_in_every_round(store):
    _fill(store)
    flip_chunk_byte(store.path, "crc32c", 0, 2)
    again = LabelStore.create_or_resume(store.path, _attrs(), 2, np.arange(N) % 7)
    assert again.repairs == ["crc32c/c/0[2]: damaged or missing; shard 2 of round(s) 0, 1 will be labelled again"]
    assert again.done_mask().tolist() == [[True, True, False]] * 2 and not again.packed().any()
    np.testing.assert_array_equal(again.crcs()[:8], image_crcs(0, 8))   # the sound ones staged again
    for r in (0, 1):
        again.write_shard(r, 2, *_shard_data(store, r, 2))
    assert again.pack() == [0, 1] and again.verify() == []
    np.testing.assert_array_equal(again.crcs(), image_crcs(0, N))


def test_damaged_image_crcs_and_another_damaged_chunk_keep_the_sound_crcs(store):
    _fill(store)
    flip_chunk_byte(store.path, "probs", 0, 1)
    flip_chunk_byte(store.path, "crc32c", 0, 2)
    again = LabelStore.create_or_resume(store.path, _attrs(), 2, np.arange(N) % 7)
    assert again.done_mask().tolist() == [[True, False, False], [True, True, False]]
    np.testing.assert_array_equal(again.crcs()[:8], image_crcs(0, 8))   # shard 1's too: round 1 has it
    for r, s in ((0, 1), (0, 2), (1, 2)):
        again.write_shard(r, s, *_shard_data(store, r, s))
    assert again.pack() == [0, 1] and again.verify() == []


def test_a_full_disk_while_packing_names_the_object_and_keeps_the_shards(store, monkeypatch):
    import errno

    def full(fd):   # the object's bytes do not fit: a file system may say so only when they are flushed
        raise OSError(errno.ENOSPC, "No space left on device")

    _fill(store, rounds=[0], pack=False)
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreError, match=rf"{store.path}/boxes/c/0/0/0/0: cannot pack round 0 of {store.path} "
                                         r"\(No space left on device; .* MiB free there.*re-run the same command"):
        store.pack()
    assert store.done_mask()[0].all() and store.rounds_complete() == 0
    assert not list(store.path.rglob("*.partial"))
    monkeypatch.undo()
    assert store.pack() == [0] and store.verify([0, 1, 2]) == [f"round 1 shard {s}: not complete (staged/done/c/1/{s} "
                                                               f"unset)" for s in range(3)]


def test_a_damaged_packed_done_row_redoes_its_round(store):
    _fill(store)
    flip_chunk_byte(store.path, "done", 1, 0)
    with pytest.raises(StoreError, match="done marks .* cannot be read"):
        store.done_mask()
    again = LabelStore.create_or_resume(store.path, _attrs(), 2, np.arange(N) % 7)
    assert again.repairs == ["done/c/1/0: damaged done mark; its shard(s) will be labelled again"]
    assert again.rounds_complete() == 1 and not again.done_mask()[1].any()


def test_the_store_loads_neither_torch_nor_click_and_its_schema_not_zarr():
    """`inspect` and `verify` start without torch, and targets.py takes PROB_LEVELS from the schema cheaply."""
    import mealv2.common.store as package

    modules = sorted(f"{package.__name__}.{p.stem}" for p in Path(package.__file__).parent.glob("*.py"))
    code = ("import importlib, sys; importlib.import_module('mealv2.common.store.schema'); print('zarr' in sys.modules); "
            f"[importlib.import_module(m) for m in {modules}]; print(sorted({{'torch', 'click'}} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert len(modules) > 8 and out.split("\n")[:2] == ["False", "[]"], out



def test_a_store_labelled_but_not_packed_is_counted_alike_by_inspect_and_train(store):
    """A killed run leaves its rounds labelled, not packed: inspect and publish said 0 rounds complete, train
    'only 1/2' of the same store."""
    from mealv2.stage1_label.report import store_summary   # here: the rest of this file imports no torch
    from mealv2.stage2_train.replay import open_checked_store

    _fill(store, pack=False)
    summary = store_summary(store.path)
    assert (summary["rounds_complete"], summary["rounds_labelled"]) == (0, 2)
    store.group["staged/done"][1, 0] = False   # and round 1 cut short
    with pytest.raises(MealV2Error, match=re.escape("only 0/2 label rounds are complete (1 labelled: a run packs")):
        open_checked_store(store.path)
