"""`mealv2 label --add-teacher`: grow a finished store by one teacher's layer, over the store's own crops, without
running its teachers again or changing what it held."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import zarr
from conftest import make_image_dataset, run_cli

import mealv2
from mealv2.benchmarks.common import random_teachers
from mealv2.common.errors import MealV2Error
from mealv2.common.store.label_store import LabelStore, StoreError

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
ENSEMBLE = ("boxes", "flips", "ids", "probs", "done", "labels", "crc32c")


def label_args(data, out, *extra):
    return ["label", str(data), "-o", str(out), "--rounds", "2", "--crops-per-image", "2", "--res", "32", "--topk",
            "2", "--shard-size", "2", "--batch-size", "4", "--workers", "1", "--no-progress", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data, three teachers, a finished two-teacher store with and without --keep-teachers, and the third
    teacher's own store (the same crops: the same seed and crop settings)."""
    root = tmp_path_factory.mktemp("add_teacher")
    data = make_image_dataset(root / "data", num_classes=3, per_class=4, seed=5)
    teachers = random_teachers(("test_resnet", "test_efficientnet", "test_resnet"), 3, root, 32, first_seed=10)
    stores = {}
    for name, specs, extra in (("kept", teachers[:2], ["--keep-teachers"]), ("plain", teachers[:2], []),
                               ("third", teachers[2:], [])):
        stores[name] = root / f"{name}.zarr"
        r = run_cli(*label_args(data, stores[name], "-t", ",".join(specs), *extra), env=ONE_THREAD)
        assert r.returncode == 0, r.stderr
    return root, data, teachers, stores


def files(path: Path) -> dict[str, str]:
    """Every file of a store but its root zarr.json (whose layer attributes grow), by SHA-256."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file() and f.relative_to(path) != Path("zarr.json")}


def layers(path: Path) -> list[dict]:
    """The store's layer records (outside ``files``: its root zarr.json also records each command's run)."""
    return zarr.open_group(str(path), mode="r").attrs["mealv2_layers"]


def read(path, names) -> dict:
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][:] for name in names}


def copied(setup, tmp_path, which):
    """A copy of the setup's finished store ``which`` ("kept", "plain"), to grow."""
    copy = tmp_path / f"{which}.zarr"
    shutil.copytree(setup[3][which], copy)
    return copy


def grown(setup, tmp_path, in_process, which="kept"):
    """A copy of store ``which`` with the third teacher added, uninterrupted."""
    _, data, teachers, _ = setup
    copy = copied(setup, tmp_path, which)
    r = in_process(*label_args(data, copy, "--add-teacher", teachers[2]))
    assert r.returncode == 0, r.stderr
    return copy


@pytest.mark.parametrize("which, layer", [("kept", 2), ("plain", 0)])
def test_an_added_teacher_labels_the_stores_crops_and_leaves_the_rest_byte_identical(setup, tmp_path, in_process,
                                                                                     which, layer):
    _, data, teachers, stores = setup
    copy = copied(setup, tmp_path, which)
    before, digest = files(copy), LabelStore.open(copy).digest
    r = in_process(*label_args(data, copy, "--add-teacher", teachers[2]))
    assert r.returncode == 0, r.stderr
    after = files(copy)
    assert {k: after[k] for k in before} == before   # every array the store held: byte for byte
    store = LabelStore.open(copy)
    assert store.digest == digest and store.complete
    assert [x["teacher"]["spec"] for x in store.layers][layer] == teachers[2] and store.layers[layer]["marks"] == "own"
    # the new layer is what the third teacher alone labels over the same crops
    own = read(stores["third"], ("ids", "probs"))
    added = read(copy, (f"teachers/{layer}/ids", f"teachers/{layer}/probs", f"teachers/{layer}/done"))
    assert np.array_equal(added[f"teachers/{layer}/ids"], own["ids"])
    assert np.array_equal(added[f"teachers/{layer}/probs"], own["probs"])
    assert added[f"teachers/{layer}/done"].all()
    assert not [f for f in (copy / "staged" / "teachers").rglob("*") if f.is_file() and "/c/" in str(f)]   # packed
    assert "Traceback" not in r.stderr
    assert in_process("verify", copy).returncode == 0
    r = in_process("inspect", copy)
    assert r.returncode == 0 and teachers[2] in r.stdout
    # added again: refused, the store as it was
    r = in_process(*label_args(data, copy, "--add-teacher", teachers[2]))
    assert r.returncode != 0 and "already holds this teacher" in r.stderr and teachers[2] in r.stderr


def test_store_settings_given_beside_add_teacher_must_be_the_stores(setup, tmp_path, in_process):
    """The layer is labelled with the store's settings: one given otherwise is refused before any work, naming the
    flag and both values, from the CLI and from Python; given as the store's, the layer is an unset run's."""
    _, data, teachers, _ = setup
    copy = copied(setup, tmp_path, "plain")
    before = files(copy), (copy / "zarr.json").read_bytes()
    r = in_process(*label_args(data, copy, "--add-teacher", teachers[2], "--scale", "0.35,1", "--topk", "3"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    for said in ("--scale 0.35,1, the store's is 0.08,1", "--topk 3, the store's is 2", "drop --scale --topk"):
        assert said in " ".join(r.stderr.split()), said
    with pytest.raises(MealV2Error, match=r"--res 48, the store's is 32.*drop --res \(unset"):
        mealv2.label(mealv2.LabelConfig(str(data), [], str(copy), add_teacher=teachers[2], res=48, device="cpu"))
    assert (files(copy), (copy / "zarr.json").read_bytes()) == before   # refused before any work
    # unset: the store's settings; given as the store's (label_args): the same layer, byte for byte
    unset = copied(setup, tmp_path / "unset", "plain")
    r = in_process("label", data, "-o", unset, "--add-teacher", teachers[2], "--batch-size", 4, "--workers", 1,
                   "--no-progress", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    given = grown(setup, tmp_path / "given", in_process, "plain")
    assert files(unset) == files(given) and layers(unset) == layers(given)


@pytest.mark.slow
def test_a_student_trains_from_all_three_teachers_after_adding_the_third(setup, tmp_path, in_process):
    _, data, teachers, _ = setup
    copy = grown(setup, tmp_path, in_process)
    run = tmp_path / "run"
    r = in_process("train", data, "--labels", copy, "-a", "test_resnet", "-o", run, "--epochs", 1,
                   "--teacher-weights", "1,1,1", "--batch-size", 8, "--workers", 1, "--device", "cpu", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"1 x {teachers[2]}" in r.stdout and (run / "metrics.csv").exists()


def test_refusals_name_the_value_and_the_fix(setup, tmp_path, in_process):
    _, data, teachers, _ = setup
    # a teacher already in the ensemble
    copy = copied(setup, tmp_path, "plain")
    r = in_process(*label_args(data, copy, "--add-teacher", teachers[0]))
    assert r.returncode != 0 and "already holds this teacher in its ensemble" in r.stderr
    # DATA that is not the store's
    other = make_image_dataset(tmp_path / "other", num_classes=3, per_class=4, seed=6)
    r = in_process(*label_args(other, copy, "--add-teacher", teachers[2]))
    assert r.returncode != 0 and "is not the data" in r.stderr and "pass the store's dataset" in r.stderr
    # a teacher whose classes cannot be mapped onto the store's
    torch.manual_seed(0)
    wide = tmp_path / "wide.pth"
    torch.save(timm.create_model("test_resnet", num_classes=5).state_dict(), wide)
    r = in_process(*label_args(data, copy, "--add-teacher", f"test_resnet={wide}@32"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "has shape (5, 96)" in r.stderr
    names = tmp_path / "names.txt"
    names.write_text("class_0\nclass_1\nclass_2\nextra_a\nextra_b\n")   # the store's classes and two more
    r = in_process(*label_args(data, copy, "--add-teacher", f"test_resnet={wide}@32", "--teacher-classes",
                               f"1={names}"))
    assert r.returncode != 0 and "its 5 classes cannot be mapped onto the store's 3" in r.stderr
    assert "--teacher-classes 1=FILE" in r.stderr
    # an unfinished store (planned 3 rounds, 2 labelled)
    zarr_json = copy / "zarr.json"
    unfinished = tmp_path / "unfinished.zarr"
    shutil.copytree(copy, unfinished)
    store = LabelStore.create_or_resume(unfinished, {k: v for k, v in LabelStore.open(copy).attrs.items()
                                                     if k != "rounds_planned"}, 3, LabelStore.open(copy).labels())
    assert not store.complete
    r = in_process(*label_args(data, unfinished, "--add-teacher", teachers[2]))
    assert r.returncode != 0 and "is not finished (2/3 rounds complete)" in r.stderr and "mealv2 label" in r.stderr
    # --teachers with it
    r = in_process(*label_args(data, copy, "--add-teacher", teachers[2], "-t", teachers[0]))
    assert r.returncode != 0 and "drop --teachers" in r.stderr
    assert zarr_json.exists() and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["chunk_write:3", "shard_mark:4", "pack:1"])
def test_a_killed_add_teacher_resumes_to_the_uninterrupted_store(setup, tmp_path, in_process, kill_at):
    _, data, teachers, _ = setup
    whole = grown(setup, tmp_path, in_process)
    path = tmp_path / "killed.zarr"
    shutil.copytree(setup[3]["kept"], path)
    killed = run_cli(*label_args(data, path, "--add-teacher", teachers[2]), env={**ONE_THREAD, "MEALV2_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, f"the fault point {kill_at} was never reached"
    with pytest.raises(StoreError, match="layer 2 .* is not labelled for round 1.*--add-teacher"):
        LabelStore.open(path).read_round(1, layers=[2])   # an unfinished layer is never replayed
    r = in_process(*label_args(data, path, "--add-teacher", teachers[2]))
    assert r.returncode == 0, r.stderr
    assert files(path) == files(whole) and layers(path) == layers(whole)


@pytest.mark.slow
def test_two_ranks_add_the_same_layer_as_one(setup, tmp_path, in_process):
    _, data, teachers, _ = setup
    whole = grown(setup, tmp_path, in_process)
    path = tmp_path / "ranks.zarr"
    shutil.copytree(setup[3]["kept"], path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mealv2.cli", *label_args(data, path, "--add-teacher", teachers[2])]
    result = subprocess.run(cmd, check=False, env={**os.environ, **ONE_THREAD}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files(path) == files(whole) and layers(path) == layers(whole)
