"""Per-teacher layers (`label --keep-teachers`, `train --teacher-weights`): each teacher's own top-k over the
ensemble's crops, kept beside the ensemble's, and students trained from any weighting of them without running
a teacher again."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import zarr

from conftest import make_image_dataset, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers")
    data = make_image_dataset(root / "data", num_classes=3, per_class=4, seed=3)
    teachers = []
    for i, arch in enumerate(("test_resnet", "test_efficientnet")):
        torch.manual_seed(i)
        path = root / f"t{i}.pth"
        torch.save(timm.create_model(arch, num_classes=3).state_dict(), path)
        teachers.append(f"{arch}={path}@32")
    return root, data, teachers


def label_args(data, teachers, out, *extra, rounds=2):
    return ["label", str(data), "-t", ",".join(teachers), "-o", str(out), "--rounds", str(rounds),
            "--crops-per-image", "2", "--res", "32", "--topk", "2", "--shard-size", "2", "--batch-size", "4",
            "--workers", "1", "--no-progress", *extra]


def arrays(path, names=("boxes", "flips", "ids", "probs", "done", "labels")) -> dict:
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][:] for name in names}


def layer_names(count: int) -> tuple[str, ...]:
    return tuple(f"teachers/{j}/{name}" for j in range(count) for name in ("ids", "probs"))


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), f"array {name} differs"


@pytest.fixture(scope="module")
def kept(setup):
    """A two-teacher store with --keep-teachers, and each teacher's own store (same crops)."""
    root, data, teachers = setup
    out = root / "kept.zarr"
    r = run_cli(*label_args(data, teachers, out, "--keep-teachers"), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    alone = []
    for j, teacher in enumerate(teachers):
        path = root / f"alone{j}.zarr"
        r = run_cli(*label_args(data, [teacher], path), env=ONE_THREAD)
        assert r.returncode == 0, r.stderr
        alone.append(path)
    plain = root / "plain.zarr"
    r = run_cli(*label_args(data, teachers, plain), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    return out, alone, plain


def test_each_layer_is_what_its_teacher_alone_labels_and_the_ensemble_is_unchanged(kept):
    out, alone, plain = kept
    store = arrays(out, ("boxes", "flips", "ids", "probs", *layer_names(2)))
    assert_same({k: store[k] for k in ("boxes", "flips", "ids", "probs")}, arrays(plain, ("boxes", "flips", "ids", "probs")))
    for j, path in enumerate(alone):
        own = arrays(path, ("boxes", "ids", "probs"))
        assert np.array_equal(own["boxes"], store["boxes"])
        assert np.array_equal(store[f"teachers/{j}/ids"], own["ids"]), f"layer {j}'s ids"
        assert np.array_equal(store[f"teachers/{j}/probs"], own["probs"]), f"layer {j}'s codes"
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    assert [layer["teacher"]["spec"] for layer in attrs["mealv2_layers"]] == [
        t["spec"] for t in attrs["mealv2"]["teachers"]]
    # the layers are outside the store's identity: the ensemble's labels have the plain store's digest
    assert attrs["mealv2_sha256"] == json.loads((plain / "zarr.json").read_text())["attributes"]["mealv2_sha256"]
    assert not any((out / "staged").rglob("c/*")), "a finished store has no staged chunks"


def test_verify_names_a_damaged_layer_chunk_and_label_repairs_it(kept, setup, tmp_path, in_process):
    import shutil

    from conftest import flip_chunk_byte

    out, _, _ = kept
    root, data, teachers = setup
    copy = tmp_path / "copy.zarr"
    shutil.copytree(out, copy)
    shown = flip_chunk_byte(copy, "teachers/1/probs", 1, 2)
    r = in_process("verify", copy)
    assert r.returncode != 0 and shown in r.stdout + r.stderr
    r = in_process(*label_args(data, teachers, copy, "--keep-teachers"))
    assert r.returncode == 0, r.stderr
    assert_same(arrays(copy, ("ids", "probs", *layer_names(2))), arrays(out, ("ids", "probs", *layer_names(2))))


def test_resuming_with_other_layer_settings_is_refused(kept, setup, in_process):
    out, _, plain = kept
    _, data, teachers = setup
    r = in_process(*label_args(data, teachers, out))
    assert r.returncode != 0 and "--keep-teachers: the store keeps per-teacher layers" in r.stderr
    r = in_process(*label_args(data, teachers, plain, "--keep-teachers"))
    assert r.returncode != 0 and "--keep-teachers: the store has no per-teacher layers" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_edited_layer_record_is_refused(kept, tmp_path, in_process):
    import shutil

    out, _, _ = kept
    copy = tmp_path / "copy.zarr"
    shutil.copytree(out, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["mealv2_layers"][0]["teacher"]["weight"] = 3.0
    (copy / "zarr.json").write_text(json.dumps(meta))
    r = in_process("verify", copy)
    assert r.returncode != 0 and "'mealv2_layers' attribute" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["chunk_write:5", "shard_mark:3", "pack:2"])
def test_a_killed_run_resumes_to_the_uninterrupted_store(kept, setup, tmp_path, kill_at, in_process):
    out, _, _ = kept
    _, data, teachers = setup
    path = tmp_path / "store"
    killed = run_cli(*label_args(data, teachers, path, "--keep-teachers"), env={**ONE_THREAD, "MEALV2_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, f"the fault point {kill_at} was never reached"
    r = in_process(*label_args(data, teachers, path, "--keep-teachers"))
    assert r.returncode == 0, r.stderr
    names = ("boxes", "flips", "ids", "probs", "done", "labels", *layer_names(2))
    assert_same(arrays(path, names), arrays(out, names))


@pytest.mark.slow
def test_two_ranks_write_the_same_layers_as_one(kept, setup, tmp_path):
    out, _, _ = kept
    _, data, teachers = setup
    path = tmp_path / "store"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mealv2.cli", *label_args(data, teachers, path, "--keep-teachers")]
    result = subprocess.run(cmd, env={**os.environ, **ONE_THREAD}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on rank 0 of 2" in result.stdout
    names = ("boxes", "flips", "ids", "probs", "done", *layer_names(2))
    assert_same(arrays(path, names), arrays(out, names))
