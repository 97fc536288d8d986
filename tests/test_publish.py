"""What a store tells (issue 28): `verify --data` loads no teacher unless asked (--recompute), never
trusting checkpoints unasked; `mealv2 publish` writes a copy without its maker's checkpoint paths."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import BUCKET, flip_chunk_byte, record_fsyncs
from mealv2.common.models import checkpoints, teachers
from mealv2.common.store.label_store import LabelStore
from mealv2.common.store.schema import ATTR_KEY, DIGEST_KEY, json_digest
from mealv2.common.store.sharing import shared_spec

MISSING_CKPT = "/nonexistent/mealv2-maker/teacher.pth"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _with_teachers(store, specs: list[str]):
    """Give ``store``'s teachers other specs, as a store made elsewhere would name them (digest kept right)."""
    group = zarr.open_group(store, mode="r+")
    attrs = dict(group.attrs[ATTR_KEY])
    attrs["teachers"] = [{**t, "spec": spec} for t, spec in zip(attrs["teachers"] * len(specs), specs)]
    group.attrs.update({ATTR_KEY: attrs, DIGEST_KEY: json_digest(attrs)})
    return store


def _refuse_loading(monkeypatch):
    def load(spec, *args, **kwargs):
        raise AssertionError(f"teacher {spec} loaded")
    monkeypatch.setattr(teachers, "load_teacher", load)
    monkeypatch.setattr(teachers, "build_teacher", load)


# ---- verify --------------------------------------------------------------------------------------------

def test_verify_data_checks_the_images_without_loading_the_teachers_the_store_names(labelled, tmp_path, in_process,
                                                                                     monkeypatch):
    """A downloaded store names its maker's checkpoint paths and hub models: `verify --data` must not read
    or fetch them (issue 28); --recompute does, by the recorded specs."""
    store = _with_teachers(_copy(labelled.store, tmp_path / "store"),
                           [f"test_resnet={MISSING_CKPT}@32", "no_such_hub_model_xyz.in1k"])
    with monkeypatch.context() as m:
        _refuse_loading(m)
        checked = in_process("verify", store, "--data", labelled.data)
    assert checked.returncode == 0, checked.stderr
    assert "teachers not re-run" in checked.stdout and f"{store}: OK" in checked.stdout
    # the images are still checked against the store: another dataset is named
    other = _copy(labelled.data, tmp_path / "other")
    next(other.glob("*/*.jpg")).unlink()
    with monkeypatch.context() as m:
        _refuse_loading(m)
        refused = in_process("verify", store, "--data", other)
    assert refused.returncode == 1 and "dataset fingerprint" in refused.stderr, refused.stderr
    loaded = in_process("verify", store, "--data", labelled.data, "--recompute", 2, "--device", "cpu")
    assert loaded.returncode == 2 and f"checkpoint file {MISSING_CKPT} does not exist" in loaded.stderr, loaded.stderr


def test_recompute_needs_data(labelled, in_process):
    r = in_process("verify", labelled.store, "--recompute", 2)
    assert r.returncode == 2 and "--recompute 2 re-runs the teachers on stored crops of DATA; add --data" in r.stderr


def test_verify_recompute_trusts_checkpoints_only_when_told(labelled, in_process, monkeypatch):
    trusted = []
    read = teachers.load_checkpoint_file

    def recording(path):
        trusted.append(checkpoints._trusted.get())
        return read(path)

    monkeypatch.setattr(teachers, "load_checkpoint_file", recording)
    args = ("verify", labelled.store, "--data", labelled.data, "--recompute", 2, "--device", "cpu")
    assert in_process(*args).returncode == 0 and trusted == [False]
    assert in_process(*args, "--trust-checkpoint").returncode == 0 and trusted == [False, True]


# ---- publish -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, arch, shared", [
    ("test_resnet=/home/me/ckpts/t.pth@32", "test_resnet", "test_resnet=t.pth@32"),
    ("resnet50=/a/b/r50.pth%0.5:0.5:0.5/0.25:0.25:0.25@224*2", "resnet50", "resnet50=r50.pth%0.5:0.5:0.5/0.25:0.25:0.25@224*2"),
    ("resnet50=~/w@v2.pth", "resnet50", "resnet50=w@v2.pth"),
    ("/runs/teacher/best.pt*0.5", "resnet18", "best.pt*0.5"),          # a mealv2 checkpoint: arch from the file
    ("resnet50=r50.pth", "resnet50", "resnet50=r50.pth"),               # already a bare file name
    ("resnet50.a1_in1k@224", "resnet50.a1_in1k", "resnet50.a1_in1k@224"),  # timm names stay
    ("timm/resnet50.a1_in1k", "timm/resnet50.a1_in1k", "timm/resnet50.a1_in1k"),
])
def test_a_shared_spec_keeps_the_file_name_and_suffixes_not_the_folders(spec, arch, shared):
    assert shared_spec(spec, arch) == shared


def _every_byte(root) -> bytes:
    return b"".join(f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file())


def _assert_same_labels(published: LabelStore, original: LabelStore) -> None:
    """What training reads: every round, the labels, the images' CRCs and paths."""
    for r in range(original.rounds_planned):
        a, b = published.read_round(r), original.read_round(r)
        for name in ("boxes", "flips", "ids", "probs"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(published.labels(), original.labels())
    np.testing.assert_array_equal(published.crcs(), original.crcs())
    assert published.relpaths() == original.relpaths() and published.runs() == original.runs()
    assert published.digest == original.digest


def test_publish_writes_a_copy_without_checkpoint_folders_that_verifies_and_labels_alike(labelled, tmp_path,
                                                                                        in_process):
    folder = str(labelled.work).encode()
    assert folder in _every_byte(labelled.store)   # the teacher's checkpoint path, in the original
    dest = tmp_path / "shared" / "birds.zarr"
    r = in_process("publish", labelled.store, dest)
    assert r.returncode == 0, r.stderr
    assert f"{labelled.teacher} -> test_resnet=teacher.pth@32" in r.stdout
    assert "images' relative paths" in r.stdout and f"mealv2 verify {dest} --data DATA" in r.stdout
    assert folder not in _every_byte(dest) and socket.gethostname().encode() not in _every_byte(dest)
    published, original = LabelStore.open(dest), LabelStore.open(labelled.store)
    assert [t["spec"] for t in published.attrs["teachers"]] == ["test_resnet=teacher.pth@32"]
    assert [c["teacher"] for c in published.attrs["teacher_check"]] == ["test_resnet=teacher.pth@32"]
    _assert_same_labels(published, original)
    assert in_process("verify", dest, "--data", labelled.data).returncode == 0
    assert sorted(p.name for p in dest.parent.iterdir()) == ["birds.zarr", "birds.zarr.lock"]   # no half-copy left


def test_a_published_copy_changed_since_is_a_store_of_its_own(labelled, tmp_path, in_process):
    dest = tmp_path / "pub"
    assert in_process("publish", labelled.store, dest).returncode == 0
    assert LabelStore.open(dest).digest == LabelStore.open(labelled.store).digest
    _with_attrs(dest, temperature=2.0)   # any attribute but the stripped folders
    assert LabelStore.open(dest).digest not in (LabelStore.open(labelled.store).digest, None)


def _with_attrs(store, **values):
    group = zarr.open_group(store, mode="r+")
    attrs = {**group.attrs[ATTR_KEY], **values}
    group.attrs.update({ATTR_KEY: attrs, DIGEST_KEY: json_digest(attrs)})


@pytest.mark.slow
def test_a_run_trained_from_the_original_resumes_from_the_published_copy(labelled, tmp_path, in_process):
    dest, run = tmp_path / "pub", tmp_path / "run"
    assert in_process("publish", labelled.store, dest).returncode == 0
    common = ["-a", "test_resnet", "--batch-size", 8, "--workers", 1, "--device", "cpu"]
    first = in_process("train", labelled.data, "--labels", labelled.store, "--out", run, "--epochs", 1, *common)
    assert first.returncode == 0, first.stderr
    resumed = in_process("train", "--resume", run, "--labels", dest, "--epochs", 2, "--workers", 1)
    assert resumed.returncode == 0, resumed.stderr
    assert len((run / "metrics.csv").read_text().splitlines()) == 3   # header and two epochs


def test_publish_refuses_an_unfinished_or_damaged_store_and_leaves_no_copy(labelled, tmp_path, in_process):
    unfinished = _copy(labelled.store, tmp_path / "unfinished")
    (unfinished / "done" / "c" / "1" / "0").unlink()
    r = in_process("publish", unfinished, tmp_path / "a")
    assert r.returncode == 2 and "1 of 2 rounds complete; only a finished store is published" in r.stderr, r.stderr
    damaged = _copy(labelled.store, tmp_path / "damaged")
    place = flip_chunk_byte(damaged, "probs", 1, 0)
    r = in_process("publish", damaged, tmp_path / "b")
    assert r.returncode == 2 and f"{damaged} is damaged" in r.stderr and place in r.stderr, r.stderr
    assert "nothing was published" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.lock", "b.lock", "damaged", "unfinished"]


def test_publish_refuses_a_dest_that_holds_something_or_lies_in_the_store(labelled, tmp_path, in_process):
    store = labelled.store
    for dest, said in ((store, "is the store itself"), (store / "copy", f"is inside STORE {store}"),
                       (store / "ids" / "c", "is inside STORE")):
        r = in_process("publish", store, dest)
        assert r.returncode == 2 and said in r.stderr, r.stderr
    assert in_process("publish", store, tmp_path / "first").returncode == 0
    r = in_process("publish", store, tmp_path / "first")
    assert r.returncode == 2 and "already holds a label store" in r.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    r = in_process("publish", store, tmp_path / "busy")
    assert r.returncode == 2 and "is not empty and not a label store" in r.stderr and "notes.txt" in r.stderr
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("mine")
    r = in_process("publish", store, tmp_path / "file")
    assert r.returncode == 2 and "is a file; the copy is a store folder" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("file")) == ["file"]   # no lock, no copy
    (tmp_path / "empty").mkdir()
    assert in_process("publish", store, tmp_path / "empty").returncode == 0


def test_a_published_copy_is_durable_before_it_appears_and_a_cut_one_never_looks_complete(labelled, tmp_path,
                                                                                         monkeypatch, in_process):
    dest = tmp_path / "pub"
    built = tmp_path / "pub.creating"
    real_replace = os.replace

    class Killed(BaseException):
        pass

    def killed(src, dst):   # a kill at the rename that publishes: the copy is built, not yet under DEST's name
        if Path(dst) == dest:
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(Killed):
        in_process("publish", labelled.store, dest)
    assert not dest.exists()
    built.mkdir()
    (built / "zarr.json").write_text("{}")   # what a SIGKILL there would leave: not under DEST's name
    monkeypatch.setattr(os, "replace", real_replace)
    synced = record_fsyncs(monkeypatch, dest.exists)   # (path, was the copy visible?)
    assert in_process("publish", labelled.store, dest).returncode == 0
    hidden = {path for path, visible in synced if not visible}
    for path in (dest, *dest.rglob("*")):
        assert str(built / path.relative_to(dest)) in hidden, path
    assert (str(tmp_path), True) in synced and not built.exists()
    assert in_process("verify", dest).returncode == 0


@pytest.mark.slow
def test_publish_to_s3_writes_the_same_copy_and_it_verifies(labelled, tmp_path, in_process, moto_s3):
    url = f"s3://{BUCKET}/shared/birds.zarr"
    r = in_process("publish", labelled.store, url)
    assert r.returncode == 0, r.stderr
    local = tmp_path / "local"
    assert in_process("publish", labelled.store, local).returncode == 0
    listed = moto_s3.client.list_objects_v2(Bucket=BUCKET, Prefix="shared/")["Contents"]
    objects = {o["Key"].removeprefix("shared/birds.zarr/"): moto_s3.client.get_object(Bucket=BUCKET, Key=o["Key"])
               ["Body"].read() for o in listed if o["Key"].startswith("shared/birds.zarr/")}
    assert objects == {str(f.relative_to(local)): f.read_bytes() for f in local.rglob("*") if f.is_file()}
    assert [o["Key"] for o in listed if not o["Key"].startswith("shared/birds.zarr/")] == []   # lease released
    _assert_same_labels(LabelStore.open(url), LabelStore.open(labelled.store))
    assert in_process("verify", url, "--data", labelled.data).returncode == 0
