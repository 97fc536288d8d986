"""Teachers as users bring them: trained outside mealv2 by a plain PyTorch + timm loop, with
their own mean/std and their own class ids, on data whose folders sort differently.

Each default that would silently feed them wrong inputs either does what the user meant or
stops with an error that names the teacher, the agreement as configured and with the fix,
and the fix.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch

from conftest import make_image_dataset, train_outside_mealv2
from mealv2.common.models.checkpoints import save_checkpoint
from mealv2.common.store.label_store import LabelStore

pytestmark = pytest.mark.slow

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RAW = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
# the teachers' class ids: not the folders' sorted order
TEACHER_ORDER = ["class_2", "class_0", "class_3", "class_1"]
LABEL = ["--rounds", 1, "--res", 32, "--crops-per-image", 2, "--topk", 2, "--device", "cpu", "--workers", 2]


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    work = tmp_path_factory.mktemp("external")
    data = make_image_dataset(work / "data", num_classes=4, per_class=12, seed=5)
    order = work / "teacher_classes.txt"
    order.write_text("\n".join(TEACHER_ORDER) + "\n")
    return SimpleNamespace(
        work=work, data=data, order=order,
        imagenet=train_outside_mealv2(data, work / "imagenet.pth", TEACHER_ORDER, *IMAGENET, seed=0),
        raw=train_outside_mealv2(data, work / "raw.pth", TEACHER_ORDER, *RAW, seed=1),
        folders=train_outside_mealv2(data, work / "folders.pth", sorted(TEACHER_ORDER), *IMAGENET, seed=2))


@pytest.fixture
def cli(in_process):
    """The commands run in this process: these tests are about what they print and write, not about the process."""
    return in_process


def _percentages(text: str) -> list[str]:
    return re.findall(r"([0-9.]+)% ", text)


def test_folders_in_another_order_than_the_teachers_classes_are_refused(ext, tmp_path, cli):
    out = tmp_path / "store"
    r = cli("label", ext.data, "-t", f"test_resnet={ext.imagenet}", "-o", out, *LABEL)
    assert r.returncode == 2, r.stdout
    err = r.stderr
    assert f"teacher 1 'test_resnet={ext.imagenet}'" in err
    assert "agree with the dataset labels as configured" in err and "with its classes re-mapped" in err
    assert "give its class names in output order, one per line, with --teacher-classes 1=FILE" in err
    assert "--no-teacher-check" in err
    assert not out.exists()                                    # nothing that looks like a store
    suggested = tmp_path / "teacher1-classes.suggested.txt"
    assert suggested.read_text().split() == TEACHER_ORDER      # the mapping it found is the true one
    configured, fixed = (float(x) for x in _percentages(err)[:2])
    assert configured < 40 and fixed > 80


def test_a_teacher_trained_on_raw_pixels_is_refused_under_imagenet_normalisation(ext, tmp_path, cli):
    r = cli("label", ext.data, "-t", f"test_resnet={ext.raw}", "--classes", ext.order, "-o", tmp_path / "s", *LABEL)
    assert r.returncode == 2, r.stdout
    assert "mean/std imagenet: default for state dicts" in r.stderr
    assert f"Fix: state its normalisation in the spec: test_resnet={ext.raw}%none." in r.stderr
    assert _fixed_command(r.stderr)[:4] == ["label", str(ext.data), "--teachers", f"test_resnet={ext.raw}%none"]
    configured, fixed = (float(x) for x in _percentages(r.stderr)[:2])
    assert fixed > configured + 10


def test_stated_inputs_label_a_store_whose_teachers_agree_with_the_labels(ext, tmp_path, cli):
    out = tmp_path / "store"
    spec = f"test_resnet={ext.imagenet},test_resnet={ext.raw}%none"
    r = cli("label", ext.data, "-t", spec, "--classes", ext.order, "-o", out, *LABEL)
    assert r.returncode == 0, r.stderr
    table = r.stdout
    assert "32 px (--res)" in table and "mean/std imagenet" in table and "mean/std none" in table
    assert "classes: mapped by name to the dataset's order" in table
    assert table.count("teacher check:") == 2 and table.count(": ok") == 2
    summary = json.loads(cli("inspect", out, "--json").stdout)
    assert [c["agreement"] > 0.8 for c in summary["teacher_check"]] == [True, True]
    assert summary["top1_agreement"] > 0.8
    text = cli("inspect", out).stdout
    assert text.count("top-1 agrees with the labels on") == 2
    # verify re-runs the teachers from the store's record (spec, res, class names) and agrees
    v = cli("verify", out, "--data", ext.data, "--recompute", 16, "--device", "cpu")
    assert v.returncode == 0 and "recomputed" in v.stdout, v.stderr
    # eval of the same state dict, same rule: --res, imagenet mean/std, --classes by name
    e = cli("eval", ext.data, "-a", "test_resnet", "--checkpoint", ext.imagenet, "--res", 32, "--classes", ext.order,
            "--json", "--device", "cpu")
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["top1"] > 80


def _fixed_command(stderr: str) -> list[str]:
    """The arguments of the command line the teacher check prints with its fixes."""
    line = stderr.split("The command with these fixes:\n", 1)[1].splitlines()[0].strip()
    assert line.startswith("mealv2 label ")
    return shlex.split(line)[1:]


def test_an_ensemble_with_one_permuted_teacher_is_fixed_by_the_printed_command(ext, tmp_path, cli):
    """Teacher 2, a mealv2 checkpoint whose recorded classes are not its outputs' (another order
    than the truth and than the folders), is the only one refused; the printed command gives it its
    own class file and leaves teacher 1, a correct state dict, as it is."""
    model = timm.create_model("test_resnet", num_classes=4)
    model.load_state_dict(torch.load(ext.imagenet))
    ckpt = tmp_path / "permuted.pt"
    save_checkpoint(ckpt, model=model, arch="test_resnet", classes=sorted(TEACHER_ORDER, reverse=True), res=32,
                    mean=IMAGENET[0], std=IMAGENET[1])
    out = tmp_path / "store"
    r = cli("label", ext.data, "-t", f"test_resnet={ext.folders},{ckpt}", "-o", out, *LABEL)
    assert r.returncode == 2, r.stdout
    assert f"teacher 2 '{ckpt}'" in r.stderr and "teacher 1" not in r.stderr
    suggested = tmp_path / "teacher2-classes.suggested.txt"
    assert suggested.read_text().split() == TEACHER_ORDER          # in the checkpoint's output order
    args = _fixed_command(r.stderr)
    assert args[-2:] == ["--teacher-classes", f"2={suggested}"] and "--classes" not in args
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    a = LabelStore.open(out).attrs
    assert [t["output_classes"] for t in a["teachers"]] == [None, TEACHER_ORDER]
    assert [c["verdict"] for c in a["teacher_check"]] == ["ok", "ok"], a["teacher_check"]
    assert a["teacher_check"][1]["agreement"] > 0.8, a["teacher_check"]


def test_no_teacher_check_labels_as_configured_and_says_so(ext, tmp_path, cli):
    out = tmp_path / "store"
    r = cli("label", ext.data, "-t", f"test_resnet={ext.imagenet}", "--no-teacher-check", "-o", out, *LABEL)
    assert r.returncode == 0, r.stderr
    assert "teacher check: skipped (--no-teacher-check)" in r.stdout
    assert LabelStore.open(out).attrs["teacher_check"] == [{"teacher": f"test_resnet={ext.imagenet}",
                                                            "skipped": True}]


def test_online_training_applies_the_same_rule_and_check(ext, tmp_path, cli):
    args = ["train", ext.data, "-a", "test_resnet", "--epochs", 1, "--batch-size", 8, "--res", 32,
            "--crops-per-image", 2, "--device", "cpu", "--workers", 2]
    r = cli(*args, "-t", f"test_resnet={ext.imagenet}", "-o", tmp_path / "wrong")
    assert r.returncode == 2 and f"--teacher-classes 1={tmp_path / 'wrong'}" in r.stderr, r.stderr
    assert not (tmp_path / "wrong" / "last.pt").exists()
    r = cli(*args, "-t", f"test_resnet={ext.imagenet}", "--classes", ext.order, "-o", tmp_path / "right")
    assert r.returncode == 0, r.stderr
    assert "32 px (--res)" in r.stdout and "teacher check:" in r.stdout and (tmp_path / "right" / "last.pt").exists()


def test_a_pretrained_timm_name_with_another_class_count_is_refused(ext, tmp_path, cli):
    r = cli("label", ext.data, "-t", "resnet18", "-o", tmp_path / "s", *LABEL)
    assert r.returncode == 2
    assert "timm's pretrained weights have 1000 classes, the dataset has 4" in r.stderr
    assert not Path(tmp_path / "s").exists()
