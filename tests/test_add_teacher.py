"""`mealv2 label --add-teacher`: grow a finished store by one teacher's layer, over the store's own crops, without
running its teachers again or changing what it held."""
from __future__ import annotations

import hashlib
import json
import os
import re
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
from mealv2.stage2_train.replay import open_checked_store

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
    # added again: a finished, sound layer is left as it is (as `label` leaves a finished store)
    r = in_process(*label_args(data, copy, "--add-teacher", teachers[2]))
    assert r.returncode == 0 and ": 0 crops in" in r.stdout and "repair" not in r.stdout, r.stderr
    assert files(copy) == after and LabelStore.open(copy).digest == digest


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
    assert r.returncode != 0 and "it has 2 classes the store lacks (extra_a, extra_b)" in r.stderr
    # given twice, or as a comma list: one teacher a run
    for given in (["--add-teacher", teachers[2], "--add-teacher", teachers[0]],
                  ["--add-teacher", ",".join(teachers[:2])]):
        r = in_process(*label_args(data, copy, *given))
        assert r.returncode == 2 and "a run adds one teacher's layer" in r.stderr and "once per teacher" in r.stderr
    r = in_process(*label_args(data, copy, "--add-teacher", teachers[2], "--dry-run"))
    assert r.returncode != 0 and "--dry-run does not apply" in r.stderr and "--keep-teachers" not in r.stderr
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
    with pytest.raises(StoreError, match="(?s)layer 3 .* is not labelled for round 1.*--add-teacher"):
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


def test_damage_in_an_added_layer_is_found_named_and_repaired_by_its_command(setup, tmp_path, in_process):
    """verify and a run training from the layer name its damaged chunk and the `--add-teacher` command that
    repairs it; a run from the ensemble is not held up by it; the command labels exactly that shard again."""
    _, data, teachers, _ = setup
    whole = grown(setup, tmp_path, in_process)
    path = tmp_path / "damaged.zarr"
    shutil.copytree(whole, path)
    packed = path / "teachers/2/probs/c/1/0/0/0"   # round 1's object of the added layer's codes
    raw = bytearray(packed.read_bytes())
    raw[10] ^= 0xFF   # inside shard 0's chunk
    packed.write_bytes(bytes(raw))
    (path / "teachers/2/ids/c/0/0/0/0").unlink()   # round 0's object of its ids: every shard of the round
    r = in_process("verify", path)
    assert r.returncode != 0
    assert f"layer 3 ({teachers[2]}): teachers/2/probs/c/1/0/0/0[0]: unreadable chunk" in r.stdout + r.stderr
    assert f"layer 3 ({teachers[2]}): teachers/2/ids/c/0/0/0/0[1]: missing chunk" in r.stdout + r.stderr
    assert f"--add-teacher {teachers[2]}" in r.stdout + r.stderr
    open_checked_store(path)   # the ensemble's labels are sound: trained from as they are
    with pytest.raises(MealV2Error, match=r"(?s)layer 3 .*teachers/2/probs/c/1/0/0/0\[0\].*--add-teacher"):
        open_checked_store(path, teacher_weights=(0, 0, 1))
    r = in_process(*label_args(data, path, "--add-teacher", teachers[2]))
    assert r.returncode == 0, r.stderr
    assert "repair: teachers/2/probs/c/1/0/0/0[0]: damaged or missing; shard 0 of round 1" in r.stdout
    labelled = int(re.search(r"--add-teacher: (\d+) crops in", r.stdout).group(1))
    assert 0 < labelled < 2 * 12 * 2   # only the damaged shards were labelled again, not the 2 rounds x 12 x 2
    assert files(path) == files(whole) and in_process("verify", path).returncode == 0


def test_a_layers_teacher_changed_under_the_same_spec_is_refused_naming_what_changed(setup, tmp_path, in_process):
    _, data, teachers, _ = setup
    copy = copied(setup, tmp_path, "plain")
    checkpoint = tmp_path / "t.pth"
    shutil.copy(teachers[2].split("=")[1].split("@")[0], checkpoint)
    spec = f"test_resnet={checkpoint}@32"
    assert in_process(*label_args(data, copy, "--add-teacher", spec)).returncode == 0
    before = files(copy)
    torch.manual_seed(1)
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), checkpoint)   # retrained in place
    r = in_process(*label_args(data, copy, "--add-teacher", spec))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"layer 1 ({spec}) was labelled from this spec, which now loads another teacher (sha256" in r.stderr
    assert "restore the teacher as it was" in r.stderr and files(copy) == before


def test_inspect_lists_every_layer_by_its_weight_position_and_counts_its_bytes(setup, tmp_path, in_process):
    """An added teacher is in no ensemble list: inspect lists the layers (what --teacher-weights positions
    mean), and bytes_per_crop counts the added layer's ids and codes too."""
    _, data, teachers, _ = setup
    copy = grown(setup, tmp_path, in_process)
    shown = json.loads(in_process("inspect", copy, "--json").stdout)
    assert [(x["position"], x["teacher"]["spec"], x["added_by"], x["finished"]) for x in shown["layers"]] == [
        (1, teachers[0], "--keep-teachers", True), (2, teachers[1], "--keep-teachers", True),
        (3, teachers[2], "--add-teacher", True)]
    assert shown["layers"][2]["teacher_check"]["teacher"] == teachers[2]
    by_layer = shown["bytes_per_crop_by_layer"]
    assert len(by_layer) == 5 and sum(by_layer.values()) == pytest.approx(shown["bytes_per_crop"], abs=0.05)
    text = in_process("inspect", copy).stdout
    assert "per-teacher layers (their --teacher-weights positions):" in text
    assert f"  3. --add-teacher: {teachers[2]}  (test_resnet, 32 px" in text


def test_the_report_gives_an_added_teachers_accuracy_beside_the_kept_ones(setup, tmp_path, in_process):
    _, data, teachers, _ = setup
    copy = grown(setup, tmp_path, in_process)
    out = tmp_path / "report"
    r = in_process("inspect", copy, "--report", out)
    assert r.returncode == 0, r.stderr
    report = (out / "report.md").read_text()
    assert "## The teacher 3's labels" in report and (out / "teacher3-confidence.png").exists()
    assert f"| 3 | `{teachers[2]}` | test_resnet | 32 | - (added) |" in report
    g = zarr.open_group(str(copy), mode="r")
    labels, top1 = g["labels"][:], [g[f"teachers/{j}/ids"][..., 0] for j in range(3)]
    row = next(line for line in report.split("teachers agree on top-1")[1].splitlines() if line.startswith("| **all"))
    hits = [f"{100 * (t == labels[None, :, None]).mean():.1f} %" for t in top1]
    agree = f"{100 * ((top1[0] == top1[1]) & (top1[1] == top1[2])).mean():.1f} %"
    assert row == f"| **all** | {top1[0].size} | {agree} | {' | '.join(hits)} |"


def test_a_report_into_a_folder_of_an_earlier_one_replaces_it_and_leaves_other_files(setup, tmp_path, in_process):
    """A three-layer store's report, then a plain store's into the same folder: the first one's pictures of
    teachers 1-3 must not stay beside a report that does not link them."""
    out = tmp_path / "report"
    assert in_process("inspect", grown(setup, tmp_path, in_process), "--report", out).returncode == 0
    assert (out / "teacher3-confidence.png").exists()
    (out / "notes.txt").write_text("mine")
    r = in_process("inspect", copied(setup, tmp_path, "plain"), "--report", out)
    assert r.returncode == 0 and "in place of the report there and the files it linked" in r.stdout
    links = re.findall(r"\]\(([^)\s]+)\)", (out / "report.md").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted({"report.md", "notes.txt", *links})


def test_the_report_of_a_plain_store_grown_by_one_teacher_gives_its_accuracy_alone(setup, tmp_path, in_process):
    _, data, teachers, _ = setup
    copy = grown(setup, tmp_path, in_process, "plain")
    out = tmp_path / "report"
    assert in_process("inspect", copy, "--report", out).returncode == 0
    report = (out / "report.md").read_text()
    assert "keeps the labels of the teachers added to it (`--add-teacher`" in report
    assert f"| 1 | `{teachers[2]}` | test_resnet | 32 | - (added) |" in report and "| - | `" in report
    assert "teachers agree on top-1" not in report and "| class | crops | teacher 1 top-1 = label |" in report
