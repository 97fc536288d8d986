"""--resume continues a run on the images it was trained on (run_data.py), in all three modes: other DATA or
--val is refused naming the files, a moved or copied DATA resumes, and a run saved before the record
resumes with a warning; a store grown by `mealv2 label --rounds` resumes, another store does not."""
import json
import shutil

import pytest
import torch

from conftest import make_image_dataset
from mealv2.common.data.dataset import build_index
from mealv2.common.errors import MealV2Error
from mealv2.common.models.checkpoints import load_checkpoint_file
from mealv2.common.store.label_store import LabelStore
from mealv2.stage2_train.config import TrainConfig
from mealv2.stage2_train.run_config import resume_config
from mealv2.stage2_train.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RUN = {"arch": "test_resnet", "batch_size": 8, "workers": 2, "device": "cpu", "progress": False, "epochs": 1}
FRESH = {"res": 32, "crops_per_image": 2}
LABEL_FLAGS = ["--res", 32, "--crops-per-image", 2, "--topk", 2, "--batch-size", 8, "--workers", 2, "--device", "cpu"]


@pytest.fixture
def data(tiny_data, tmp_path):
    return shutil.copytree(tiny_data, tmp_path / "data")


@pytest.fixture
def val_dir(tmp_path):
    """Images at the same relative paths as the first two of each of DATA's classes, of other content."""
    return make_image_dataset(tmp_path / "val", per_class=2, seed=7)


def test_hard_labels_resume_on_the_val_set_is_refused_naming_the_files(data, val_dir, tmp_path, in_process):
    run = tmp_path / "run"
    train(TrainConfig(str(data), str(run), hard_labels=True, **FRESH, **RUN))
    fingerprint = build_index(data).fingerprint
    assert load_checkpoint_file(run / "last.pt")["datasets"]["data"]["fingerprint"] == fingerprint
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["images"] == {"data": {"fingerprint": fingerprint, "num_images": 12}, "val": None}

    r = in_process("train", val_dir, "--resume", run, "--epochs", 2)
    assert r.returncode == 2
    message = r.stderr.replace("\n", " ")
    assert f"DATA {val_dir}: fingerprint" in message and "(6 images), the run's" in message and "(12 images)" in message
    assert ("dataset changes since the run started: DATA lacks 6 image(s): class_0/img_02.png, class_0/img_03.jpg, "
            "class_1/img_02.png, class_1/img_03.jpg, class_2/img_02.png, ...") in message
    assert f"Pass the images the run was started with (DATA {data}, or a copy of them elsewhere)" in message
    assert len(load_checkpoint_file(run / "last.pt")["metrics"]) == 1

    moved = data.rename(tmp_path / "moved")   # the same images elsewhere: the run goes on
    r = in_process("train", moved, "--resume", run, "--epochs", 2)
    assert r.returncode == 0, r.stderr
    assert [row["epoch"] for row in load_checkpoint_file(run / "last.pt")["metrics"]] == [0, 1]


def test_online_resume_on_other_data_is_refused_and_an_old_run_resumes_with_a_warning(labelled, data, tmp_path,
                                                                                       capsys):
    run = tmp_path / "run"
    train(TrainConfig(str(data), str(run), teachers=[labelled.teacher], teacher_check=False, **FRESH, **RUN))
    other = shutil.copytree(data, tmp_path / "other")
    (other / "class_1" / "img_03.jpg").rename(other / "class_1" / "img_99.jpg")
    with pytest.raises(MealV2Error, match=r"DATA lacks 1 image\(s\): class_1/img_03.jpg; DATA adds 1 image\(s\): "
                                          r"class_1/img_99.jpg"):
        train(resume_config(run, data=str(other), epochs=2))

    copied = shutil.copytree(data, tmp_path / "copied")
    assert train(resume_config(run, data=str(copied), epochs=2, dry_run=True)) == []

    ckpt = load_checkpoint_file(run / "last.pt")   # as a mealv2 before the record saved it
    del ckpt["datasets"]
    torch.save(ckpt, run / "last.pt")
    capsys.readouterr()
    assert train(resume_config(run, data=str(other), epochs=2, dry_run=True)) == []
    warning = capsys.readouterr().err
    assert (f"mealv2: warning: {run / 'last.pt'} was saved by a mealv2 that did not record the run's images, so "
            f"DATA {other} cannot be checked against them; resuming") in warning
    assert warning.count("\n") == 1


def test_stored_resume_records_the_store_data_and_refuses_another_val_set(labelled, data, val_dir, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(str(data), str(run), labels=str(labelled.store), val=str(val_dir), **RUN))
    record = load_checkpoint_file(run / "last.pt")["datasets"]
    assert record["data"]["fingerprint"] == LabelStore.open(labelled.store).attrs["dataset"]["fingerprint"]
    assert record["val"]["num_images"] == 6

    other_val = make_image_dataset(tmp_path / "other_val", per_class=2, seed=8)   # same paths, other images
    with pytest.raises(MealV2Error, match=rf"(?s)--val {other_val}: fingerprint .*the same 6 paths, so their labels "
                                          r"\(classes\) or image sizes differ.*and --val "):
        train(resume_config(run, val=str(other_val), epochs=2, dry_run=True))
    assert train(resume_config(run, val=str(shutil.copytree(val_dir, tmp_path / "val_copy")), epochs=2,
                               dry_run=True)) == []


def test_a_store_grown_by_rounds_resumes_and_another_store_is_refused(labelled, data, tmp_path, in_process):
    store = shutil.copytree(labelled.store, tmp_path / "store")
    run = tmp_path / "run"
    train(TrainConfig(str(data), str(run), labels=str(store), **RUN))
    r = in_process("label", data, "-t", labelled.teacher, "-o", store, "--rounds", 3, *LABEL_FLAGS)
    assert r.returncode == 0, r.stderr
    assert LabelStore.open(store).rounds_planned == 3

    r = in_process("train", "--resume", run, "--epochs", 2)
    assert r.returncode == 0, r.stderr
    assert (f"labels: {store} has grown from 2 to 3 rounds since the run's last epoch (its earlier rounds "
            f"unchanged); the passes from here replay round p mod 3") in r.stdout
    assert load_checkpoint_file(run / "last.pt")["store_digest"] == LabelStore.open(store).digest

    other = tmp_path / "other"
    r = in_process("label", data, "-t", labelled.teacher, "-o", other, "--rounds", 3, "--seed", 1, *LABEL_FLAGS)
    assert r.returncode == 0, r.stderr
    with pytest.raises(MealV2Error, match=f"labels: the run was trained on another label store than {other} "
                                          r"\(store digests differ\)"):
        train(resume_config(run, labels=str(other), epochs=3, dry_run=True))


def test_a_run_given_relative_paths_resumes_from_another_folder_and_only_onward(labelled, data, tmp_path, monkeypatch, in_process):
    """DATA and --labels typed relative to where the run started: a resume from elsewhere reads those, not
    whatever (or nothing) has their names there ('store: not a label store' sent users after the wrong fault)."""
    shutil.copytree(labelled.store, tmp_path / "store")
    monkeypatch.chdir(tmp_path)
    r = in_process("train", "data", "--labels", "store", "-a", "test_resnet", "-o", "run", "--epochs", 1,
                   "--batch-size", 8, "--workers", 1, "--device", "cpu", "--no-progress")
    assert r.returncode == 0, r.stderr
    elsewhere = tmp_path / "elsewhere"
    make_image_dataset(elsewhere / "data", per_class=2, seed=9)   # a folder of the same name, other images
    monkeypatch.chdir(elsewhere)
    r = in_process("train", "--resume", tmp_path / "run", "--epochs", 2)
    assert r.returncode == 0, r.stderr
    assert len(load_checkpoint_file(tmp_path / "run" / "last.pt")["metrics"]) == 2
    settings = json.loads((tmp_path / "run" / "config.json").read_text())["settings"]
    assert (settings["data"], settings["labels"]) == (str(tmp_path / "data"), str(tmp_path / "store"))
    # fewer epochs than it has trained: refused (it recorded the shorter plan and trained nothing); as many:
    # nothing to do, said
    config = (tmp_path / "run" / "config.json").read_bytes()
    r = in_process("train", "--resume", tmp_path / "run", "--epochs", 1)
    assert r.returncode == 2 and "--epochs 1: " in r.stderr and "has trained 2 epochs already" in r.stderr
    assert (tmp_path / "run" / "config.json").read_bytes() == config
    r = in_process("train", "--resume", tmp_path / "run")
    assert r.returncode == 0 and "has trained all its 2 epochs; nothing to do" in r.stdout
