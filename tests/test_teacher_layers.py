"""Per-teacher layers (`label --keep-teachers`, `train --teacher-weights`): each teacher's own top-k over the
ensemble's crops, kept beside the ensemble's, and students trained from any weighting of them without running
a teacher again."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from conftest import make_image_dataset, run_cli
from mealv2.benchmarks.common import random_teachers
from mealv2.common.config import Weights
from mealv2.common.errors import MealV2Error

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers")
    data = make_image_dataset(root / "data", num_classes=3, per_class=4, seed=3)
    teachers = random_teachers(("test_resnet", "test_efficientnet"), 3, root, 32)
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
    for name, values in a.items():
        assert np.array_equal(values, b[name]), f"array {name} differs"


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
    _, data, teachers = setup
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


# ---- stage 2: students from the layers, no teacher run ----------------------------------------------

@pytest.fixture
def no_teachers(monkeypatch):
    """Stage 2 must not build a teacher: every way to one fails."""
    from mealv2.common.models import teachers as teachers_module
    from mealv2.stage2_train import modes

    def refuse(*args, **kwargs):
        raise AssertionError("a teacher was loaded in stage 2")
    monkeypatch.setattr(teachers_module, "build_teacher", refuse)
    monkeypatch.setattr(modes, "load_teacher", refuse)


def replayed_targets(store, data, **kw) -> torch.Tensor:
    import mealv2

    loader = mealv2.ReplayLoader(store, data, batch_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, device="cpu",
                                 workers=1, **kw)
    return torch.cat([targets for _, targets in loader])


def test_replayed_layer_targets_are_each_teachers_and_their_weighted_mean(kept, setup, no_teachers):
    out, alone, _ = kept
    _, data, _ = setup
    own = [replayed_targets(path, data) for path in alone]
    for j in range(2):
        weights = tuple(float(i == j) for i in range(2))
        torch.testing.assert_close(replayed_targets(out, data, teacher_weights=weights), own[j], rtol=0, atol=1e-6)
    torch.testing.assert_close(replayed_targets(out, data, teacher_weights=(1,)), own[0], rtol=0, atol=1e-6)
    mixed = (2 * own[0] + own[1]) / 3
    torch.testing.assert_close(replayed_targets(out, data, teacher_weights=(2, 1)), mixed / mixed.sum(1, keepdim=True),
                               rtol=0, atol=1e-6)
    ensemble = replayed_targets(out, data)
    assert not torch.allclose(ensemble, own[0]) and not torch.allclose(ensemble, own[1])
    # weights are relative at any size: float32 flushed 1e-45 and overflowed 1e308 + 1e308 (NaN targets)
    for weights, want in (((1e-45, 0), own[0]), ((0, 1e-320), own[1]),
                          ((1e308, 1e308), replayed_targets(out, data, teacher_weights=(1, 1)))):
        torch.testing.assert_close(replayed_targets(out, data, teacher_weights=weights), want, rtol=0, atol=1e-6)
    # a saved replay continues only with the weighting it replayed
    import mealv2

    def loader(**kw):
        return mealv2.ReplayLoader(out, data, batch_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, device="cpu", workers=1,
                                   **kw)
    saved = loader(teacher_weights=(2, 1)).state_dict()
    loader(teacher_weights=(2.0, 1.0)).load_state_dict(saved)
    with pytest.raises(MealV2Error, match="teacher_weights: the saved loader has"):
        loader().load_state_dict(saved)


@pytest.mark.parametrize("weights", [None, (1.0, 0.0), (0.0, 1.0), (2.0, 1.0)], ids=["ensemble", "first", "second", "2,1"])
def test_a_student_trains_from_any_weighting_of_the_layers_without_a_teacher(kept, setup, tmp_path, weights,
                                                                            no_teachers, capsys):
    import mealv2

    out, _, _ = kept
    _, data, _ = setup
    cfg = mealv2.TrainConfig(str(data), str(tmp_path / "run"), "test_resnet", labels=str(out), teacher_weights=weights,
                             epochs=1, batch_size=8, workers=1, device="cpu", progress=False)
    mealv2.train(cfg)
    said = capsys.readouterr().out
    assert ("per-teacher layers averaged with weights" in said) == (weights is not None)
    assert (tmp_path / "run" / "last.pt").exists()
    # the config's equivalent command trains the same (the run records it, resumes compare it)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["settings"]["teacher_weights"] == (
        None if weights is None else list(weights))
    if weights is not None:   # a resume keeps the weights, and refuses other ones
        mealv2.train(mealv2.resume_config(tmp_path / "run", epochs=2))
        with pytest.raises(MealV2Error, match="teacher_weights"):
            mealv2.train(mealv2.resume_config(tmp_path / "run", epochs=3, teacher_weights=(1.0, 3.0)))


@pytest.mark.parametrize("weights, said", [
    ((1.0, 1.0, 1.0), "--teacher-weights 1,1,1: 3 weights"),
])
def test_more_weights_than_layers_are_refused_naming_the_layers(kept, setup, tmp_path, in_process, weights, said):
    out, _, _ = kept
    _, data, _ = setup
    r = in_process("train", data, "--labels", out, "-a", "test_resnet", "-o", tmp_path / "run", "--teacher-weights",
                   ",".join(f"{w:g}" for w in weights), "--dry-run", "--device", "cpu", "--workers", "1")
    assert r.returncode != 0 and said in r.stderr and "1. test_resnet=" in r.stderr and "Traceback" not in r.stderr


def test_teacher_weights_on_a_store_without_layers_name_keep_teachers(kept, setup, tmp_path, in_process):
    _, _, plain = kept
    _, data, _ = setup
    r = in_process("train", data, "--labels", plain, "-a", "test_resnet", "-o", tmp_path / "run", "--teacher-weights",
                   "1,0", "--dry-run", "--device", "cpu", "--workers", "1")
    assert r.returncode != 0 and "has no per-teacher layers" in r.stderr and "--keep-teachers" in r.stderr


@pytest.mark.parametrize("value, said", [
    ((0.0, 0.0), "is all zeros"), ((1.0, -1.0), "negative or non-finite"), ((1.0, float("nan")), "non-finite"),
    ((), "is not a list of numbers"),
])
def test_bad_weights_are_refused_by_the_config(value, said):
    import mealv2

    with pytest.raises(MealV2Error, match=said):
        mealv2.TrainConfig("d", "o", "a", labels="s", teacher_weights=value)


def test_a_weight_past_floats_range_is_read_as_infinite_and_refused():
    """'1e400' made the flag's parser raise OverflowError (a traceback) instead of the refusal."""
    weights = Weights().parse("1e400,1")
    assert weights == (math.inf, 1.0) and "non-finite" in Weights().problem(weights)


def test_inspect_reports_bytes_per_crop_per_layer(kept, in_process):
    out, _, plain = kept
    layers = json.loads(in_process("inspect", out, "--json").stdout)
    by_layer = layers["bytes_per_crop_by_layer"]
    assert list(by_layer)[2:] == [f"teacher {j + 1}: {t['spec']}" for j, t in enumerate(layers["teachers"])]
    assert all(v > 0 for v in by_layer.values())
    assert sum(by_layer.values()) == pytest.approx(layers["bytes_per_crop"], abs=0.05)
    assert list(json.loads(in_process("inspect", plain, "--json").stdout)["bytes_per_crop_by_layer"]) == [
        "crops (boxes, flips)", "ensemble"]


def test_recombined_layers_come_close_to_the_exact_ensemble():
    """KL(exact ensemble || per-teacher top-k recombined) is finite and no larger than the store encoding's own
    KL(exact ensemble || stored ensemble top-k): both are mostly the tail a top-k spreads evenly, and the
    recombination keeps the union of the teachers' top-k (up to 3k classes here)."""
    from mealv2.common.data.targets import recombination_kl

    torch.manual_seed(0)
    classes, k = 100, 5
    shared = 3 * torch.randn(256, classes)
    probs = [torch.softmax(shared + torch.randn(256, classes), dim=1) for _ in range(3)]
    stored, recombined = recombination_kl(probs, [1.0, 1.0, 1.0], k)
    assert torch.isfinite(stored).all() and torch.isfinite(recombined).all()
    assert (stored >= -1e-9).all() and (recombined >= -1e-9).all()
    assert recombined.mean() < stored.mean() < 0.5
    one, _ = recombination_kl(probs[:1], [1.0], k)
    _, alone = recombination_kl(probs[:1], [1.0], k)
    torch.testing.assert_close(alone, one, rtol=1e-4, atol=1e-7)   # one teacher: the recombination is the stored top-k itself


def test_a_dry_run_counts_the_layers_objects_and_bytes(kept, setup, tmp_path, in_process):
    import re

    out, _, _ = kept
    _, data, teachers = setup
    r = in_process(*label_args(data, teachers, tmp_path / "s", "--keep-teachers", "--dry-run"))
    assert r.returncode == 0, r.stderr
    objects = int(re.search(r"(\d+) objects once finished", r.stdout).group(1))
    assert objects == sum(1 for f in out.rglob("*") if f.is_file())
    said = float(re.search(r"the store: ([\d.]+) B/crop", r.stdout).group(1))
    assert said == pytest.approx(json.loads(in_process("inspect", out, "--json").stdout)["bytes_per_crop"], rel=0.02)
