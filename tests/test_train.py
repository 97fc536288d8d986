"""`mealv2 train` end to end on fixture data: every mode, checkpoints, resume, refusals, DDP."""
import csv
import json
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from conftest import make_image_dataset
from mealv2.common.errors import MealV2Error
from mealv2.common.models.checkpoints import load_checkpoint_file
from mealv2.common.store.label_store import LabelStore
from mealv2.stage2_train.config import TrainConfig
from mealv2.stage2_train.trainer import train
from mealv2.stage2_train.utils import METRICS

FAST = ["--device", "cpu", "--workers", "2", "--batch-size", "8"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cli(in_process):
    """`mealv2` commands in this process: what they print and write is the same, without an interpreter start
    each; the runs that must be processes (killed, torchrun) are started as such below."""
    return in_process


def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == list(METRICS)
    return rows


def assert_run_outputs(run: Path, epochs: int, arch: str, val: bool) -> list[dict]:
    rows = read_metrics(run)
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))
    assert all(float(r["loss"]) > 0 and float(r["img_per_s"]) > 0 for r in rows)
    assert (run / "curves.png").stat().st_size > 1000
    assert (run / "best.pt").is_file() == val
    ckpt = load_checkpoint_file(run / "last.pt")
    assert ckpt["arch"] == arch and ckpt["classes"] == ["class_0", "class_1", "class_2"] and ckpt["res"] == 32
    assert ckpt["epoch"] == epochs
    return rows


@pytest.mark.slow
def test_stored_labels_with_discriminator_and_cutmix(labelled, tmp_path, cli):
    run = tmp_path / "run"
    r = cli("train", labelled.data, "--labels", labelled.store, "-a", "test_resnet", "-o", run, "--epochs", 3,
                "--val", labelled.data, "--use-discriminator-loss", "--w-cutmix", *FAST)
    assert r.returncode == 0, r.stderr
    rows = assert_run_outputs(run, 3, "test_resnet", val=True)
    assert all(float(row["d_loss"]) > 0 and 0 <= float(row["val_top1"]) <= 100 for row in rows)
    # 12 images x 2 crops, 8 crops per step: a pass is 3 steps, an epoch (12 crops) round(12 / 8) = 2 steps
    assert "epoch = 12 crops (one per image, as MEAL V2 and FKD count): 2 steps of 8 crops" in r.stdout
    assert "3 epochs = 6 steps = 2.00 passes over the images" in r.stdout
    assert "pass p replays round p mod 2: each round 1.00 times" in r.stdout
    assert "epoch 2/3" in r.stdout and "steps per rank [2]" in r.stdout
    assert [int(row["crops_seen"]) for row in rows] == [16, 32, 48]
    ckpt = load_checkpoint_file(run / "last.pt")
    assert tuple(ckpt["mean"]) == timm.create_model("test_resnet").pretrained_cfg["mean"]
    assert ckpt["discriminator"] is not None and ckpt["d_optimizer"]["state"]


@pytest.mark.slow
def test_hard_labels_run_makes_a_teacher_for_label(labelled, tmp_path, cli):
    run = tmp_path / "run"
    r = cli("train", labelled.data, "--hard-labels", "-a", "test_efficientnet", "-o", run, "--epochs", 2,
                "--res", 32, "--crops-per-image", 2, "--mixup", 0.4, "--cos", "--warmup-epochs", 1, *FAST)
    assert r.returncode == 0, r.stderr
    rows = assert_run_outputs(run, 2, "test_efficientnet", val=False)
    assert rows[0]["d_loss"] == "" and rows[0]["val_top1"] == ""
    assert float(rows[0]["lr"]) < float(rows[1]["lr"])  # still warming up in epoch 0
    r = cli("label", labelled.data, "-t", run / "last.pt", "-o", tmp_path / "store", "--rounds", 1,
                "--res", 32, "--crops-per-image", 2, "--topk", 2, "--workers", 2, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    (teacher,) = LabelStore.open(tmp_path / "store").attrs["teachers"]
    assert teacher["arch"] == "test_efficientnet" and teacher["res"] == 32
    assert tuple(teacher["mean"]) == timm.create_model("test_efficientnet").pretrained_cfg["mean"]


@pytest.mark.slow
def test_online_teachers_with_torch_loader(labelled, tmp_path, cli):
    run = tmp_path / "run"
    r = cli("train", labelled.data, "--teachers", labelled.teacher, "-a", "test_convnext", "-o", run,
                "--epochs", 1, "--res", 32, "--crops-per-image", 2, "--w-cutmix", "--use-discriminator-loss",
                "--temperature", 2, "--loader", "torch", *FAST)
    assert r.returncode == 0, r.stderr
    assert_run_outputs(run, 1, "test_convnext", val=False)
    assert "online labels" in r.stdout


def config(labelled, out, **kw) -> TrainConfig:
    return TrainConfig(**{"data": str(labelled.data), "out": str(out), "arch": "test_resnet",
                          "labels": str(labelled.store), "batch_size": 8, "workers": 2, "device": "cpu",
                          "progress": False, **kw})


def test_resume_continues_exactly(labelled, tmp_path):
    kw = dict(use_discriminator_loss=True, w_cutmix=True, mixup=0.2, cutmix_prob=0.5, lr=0.05, lr_step=2,
              model_ema=True, model_ema_decay=0.5)
    straight = train(config(labelled, tmp_path / "straight", epochs=3, **kw))
    train(config(labelled, tmp_path / "resumed", epochs=2, **kw))
    with pytest.raises(MealV2Error, match="already holds a run"):
        train(config(labelled, tmp_path / "resumed", epochs=3, **kw))
    with pytest.raises(MealV2Error, match="batch_size"):
        train(config(labelled, tmp_path / "resumed", epochs=3, resume=True, **{**kw, "batch_size": 4}))
    resumed = train(config(labelled, tmp_path / "resumed", epochs=3, resume=True, **kw))
    for key in ("epoch", "lr", "loss", "d_loss"):
        assert [row[key] for row in resumed] == pytest.approx([row[key] for row in straight], abs=1e-6), key
    assert resumed[2]["lr"] == pytest.approx(0.005)   # x0.1 after --lr-step 2 epochs
    a, b = (load_checkpoint_file(p / "last.pt") for p in (tmp_path / "straight", tmp_path / "resumed"))
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6)
    for k, v in a["discriminator"].items():
        torch.testing.assert_close(b["discriminator"][k], v, rtol=0, atol=1e-6)
    for k, v in a["model_ema"].items():   # the average continues where it stopped, at the same decay
        torch.testing.assert_close(b["model_ema"][k], v, rtol=0, atol=1e-6)
    assert [float(r["loss"]) for r in read_metrics(tmp_path / "resumed")] == pytest.approx(
        [r["loss"] for r in straight], abs=1e-6)


def test_dry_run_checks_everything_prints_the_plan_and_trains_nothing(labelled, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(config(labelled, run, epochs=10, lr_step=4, batch_size=8, dry_run=True)) == []
    plan = capsys.readouterr().out
    # 12 images x 2 crops, 8 crops per step: an epoch of 12 crops is round(12 / 8) = 2 steps; a pass is 3 steps
    for line in ("8 crops per step globally (--batch-size) = 1 rank(s) x 4 images x 2 crops",
                 "epoch = 12 crops (one per image, as MEAL V2 and FKD count): 2 steps of 8 crops = 16 crops; "
                 "10 epochs = 20 steps = 6.67 passes over the images",
                 "lr (x0.1 every 4 epochs): epoch 0: 0.01, epoch 4: 0.001, epoch 8: 0.0001, epoch 9: 0.0001",
                 "2 rounds (pass p replays round p mod 2: round 0 3.7 times, round 1 3.0 times; 3.33 on average), top-2",
                 "one round in RAM per rank"):
        assert line in plan, plan
    assert not run.exists()
    with pytest.raises(MealV2Error, match="--batch-size 9 .* use 8 or 10"):   # checks still run
        train(config(labelled, run, epochs=10, batch_size=9, dry_run=True))


def test_resume_names_every_setting_that_would_change_the_run(labelled, tmp_path):
    run = tmp_path / "run"
    kw = dict(cos=True, use_discriminator_loss=True, lr=0.05, wd=1e-4)
    train(config(labelled, run, epochs=2, **kw))
    changed = dict(kw, lr=0.1, wd=0.0, w_cutmix=True, mixup=0.2, use_discriminator_loss=False, model_ema=True)
    with pytest.raises(MealV2Error) as refused:
        train(config(labelled, run, epochs=4, resume=True, dry_run=True, **changed))
    message = str(refused.value)
    for name, was, now in [("lr", 0.05, 0.1), ("wd", 0.0001, 0.0), ("w_cutmix", False, True), ("mixup", 0.0, 0.2),
                           ("use_discriminator_loss", True, False), ("model_ema", False, True), ("epochs", 2, 4)]:
        assert f"{name}: the run has {was!r}, this command {now!r}" in message, message
    # Where things run may change; so may --epochs when the schedule does not depend on it (no --cos).
    assert train(config(labelled, run, epochs=2, resume=True, dry_run=True, workers=1, loader="torch", **kw)) == []
    step_run = tmp_path / "step"
    train(config(labelled, step_run, epochs=1, lr_step=5))
    assert train(config(labelled, step_run, epochs=3, lr_step=5, resume=True, dry_run=True)) == []


@pytest.mark.parametrize("field", ["lr", "momentum", "wd", "d_lr", "temperature", "cutmix_prob", "mixup"])
def test_non_finite_settings_are_refused_in_python_too(field):
    from mealv2.stage1_label.config import LabelConfig
    for value in (float("nan"), float("inf")):
        with pytest.raises(MealV2Error, match=rf"train: {field} = {value!r} is not a finite number"):
            TrainConfig(data="d", out="o", arch="a", hard_labels=True, **{field: value})
    with pytest.raises(MealV2Error, match="label: temperature = nan is not a finite number"):
        LabelConfig(data="d", teachers=["t"], out="o", temperature=float("nan"))


def test_compile_trains_the_same_and_checkpoints_the_bare_model(labelled, tmp_path, monkeypatch):
    """--compile goes through torch.compile (dynamo's graph capture of the student, with DDP when distributed).
    Inductor's code generation takes minutes per tiny model on these 2 cores, so dynamo runs here with its
    eager backend; `mealv2 bench gpu` runs the real inductor path on a GPU."""
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or
                        real_compile(module, backend="eager"))
    plain = train(config(labelled, tmp_path / "plain", epochs=1))
    with_compile = train(config(labelled, tmp_path / "compiled", epochs=1, compile=True))
    assert len(compiled) == 1
    assert with_compile[0]["loss"] == pytest.approx(plain[0]["loss"], abs=1e-5)
    saved = load_checkpoint_file(tmp_path / "compiled" / "last.pt")["model"]
    assert not any(k.startswith("_orig_mod.") for k in saved)
    assert saved.keys() == load_checkpoint_file(tmp_path / "plain" / "last.pt")["model"].keys()


def test_store_mismatches_are_refused(labelled, tmp_path, cli):
    other = shutil.copytree(labelled.data, tmp_path / "other")
    shutil.copy(other / "class_0" / "img_03.jpg", other / "class_0" / "img_99.jpg")
    both = r"fingerprint [0-9a-f]{16} \(12 images\).*fingerprint [0-9a-f]{16} \(13 images\)"
    with pytest.raises(MealV2Error, match=both):
        train(config(labelled, tmp_path / "r1", epochs=1, data=str(other)))

    renamed = shutil.copytree(labelled.data, tmp_path / "renamed")
    (renamed / "class_2").rename(renamed / "zebra")
    both = r"3 classes \['class_0', 'class_1', 'class_2'\].*3 classes \['class_0', 'class_1', 'zebra'\]"
    with pytest.raises(MealV2Error, match=both):
        train(config(labelled, tmp_path / "r2", epochs=1, data=str(renamed)))

    # --res is the student's and may differ from the store's (test_student_res.py); the stored crops may not,
    # whether given as flags or to a TrainConfig in Python (which once trained on the store's without a word)
    with pytest.raises(MealV2Error, match=r"--crops-per-image 8 differs from the 2 that .*store was labelled with"):
        train(config(labelled, tmp_path / "r3", epochs=1, res=48, crops_per_image=8))
    with pytest.raises(MealV2Error, match=r"--ratio 0.5,2 differs from the \[0\.75, 1\.3333333333333333\]"):
        train(config(labelled, tmp_path / "r3", epochs=1, ratio=(0.5, 2.0)))
    assert not (tmp_path / "r3").exists()

    incomplete = shutil.copytree(labelled.store, tmp_path / "incomplete")
    (incomplete / "done" / "c" / "1" / "0").unlink()
    r = cli("train", labelled.data, "--labels", incomplete, "-a", "test_resnet", "-o", tmp_path / "r4", *FAST)
    assert r.returncode == 2
    assert f"mealv2: error: {incomplete}: only 1/2 label rounds are complete" in r.stderr
    assert "re-running the `mealv2 label` command" in r.stderr
    assert not (tmp_path / "r4").exists()


@pytest.mark.slow
def test_resume_after_a_kill_reproduces_the_loss_curve(labelled, tmp_path, cli):
    straight = train(config(labelled, tmp_path / "straight", epochs=4, use_discriminator_loss=True, w_cutmix=True,
                            lr=0.05, model_ema=True, model_ema_decay=0.7))
    flags = ["--epochs", 4, "--use-discriminator-loss", "--w-cutmix", "--lr", 0.05, "--model-ema", "--model-ema-decay",
             0.7, *FAST]
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "mealv2.cli", "train", labelled.data, "--labels", labelled.store, "-a", "test_resnet",
            "-o", run, *flags]
    proc = subprocess.Popen(list(map(str, args)), env={**os.environ, **ONE_THREAD},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)   # mid-run: after the first checkpoint, wherever it is now
    proc.wait()
    killed_after = load_checkpoint_file(run / "last.pt")["epoch"]
    resumed = cli("train", labelled.data, "--labels", labelled.store, "-a", "test_resnet", "-o", run, "--resume",
                  *flags)
    assert resumed.returncode == 0, resumed.stderr
    assert 1 <= killed_after < 4, "the run was not killed mid-way"
    assert f"resuming {run / 'last.pt'} at epoch {killed_after}" in resumed.stdout
    rows = read_metrics(run)
    for key in ("epoch", "lr", "loss", "d_loss"):
        assert [float(r[key]) for r in rows] == pytest.approx([r[key] for r in straight], abs=1e-6), key
    a, b = (load_checkpoint_file(p / "last.pt")["model_ema"] for p in (tmp_path / "straight", run))
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=1e-6)


def test_init_from_a_state_dict_and_tensorboard(labelled, tmp_path):
    cfg = config(labelled, tmp_path / "run", epochs=1, init=str(labelled.work / "teacher.pth"), tensorboard=True)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(MealV2Error, match="--tensorboard needs the tensorboard package"):
            train(cfg)
        cfg.tensorboard = False
        train(cfg)
    else:
        train(cfg)
        assert list((tmp_path / "run" / "tensorboard").glob("events.*"))
    assert (tmp_path / "run" / "last.pt").is_file()
    with pytest.raises(MealV2Error, match="--init .*shape"):
        train(config(labelled, tmp_path / "run2", epochs=1, arch="test_resnet", hard_labels=True, labels=None,
                     init=str(labelled.work / "teacher.pth"), data=str(make_image_dataset(tmp_path / "four", 4))))


def test_model_ema_is_validated_saved_and_chosen_by_eval_and_export(labelled, tmp_path):
    from click.testing import CliRunner
    from safetensors import safe_open

    from mealv2.cli import cli as group

    def invoke(*args):   # in this process: the commands' start-up is paid once
        return CliRunner().invoke(group, [str(a) for a in args])

    run, val = tmp_path / "run", make_image_dataset(tmp_path / "val", num_classes=3, per_class=4, seed=7)
    r = invoke("train", labelled.data, "--labels", labelled.store, "-a", "test_resnet", "-o", run, "--epochs", 2,
               "--lr", 0.2, "--model-ema", "--model-ema-decay", 0.6, "--val", val, *FAST)
    assert r.exit_code == 0, r.output
    assert "weight EMA (timm's ModelEmaV3): decay 0.6 per step" in r.output and "EMA top1" in r.output
    rows = read_metrics(run)
    ckpt = load_checkpoint_file(run / "last.pt")
    assert ckpt["train_config"]["model_ema"] and ckpt["model_ema"].keys() == ckpt["model"].keys()
    assert any(not torch.equal(ckpt["model_ema"][k], v) for k, v in ckpt["model"].items() if v.is_floating_point())
    for weights, flags in (("val", []), ("val_ema", ["--ema"])):
        e = invoke("eval", val, "--checkpoint", run / "last.pt", *flags, "--json", "--device", "cpu", "--workers", 1)
        assert e.exit_code == 0, e.output
        got = json.loads(e.output)
        assert got["ema"] == bool(flags)
        assert (got["top1"], got["top5"]) == (float(rows[-1][f"{weights}_top1"]), float(rows[-1][f"{weights}_top5"]))

    x = invoke("export", run / "last.pt", "--format", "safetensors", "--ema")
    assert x.exit_code == 0, x.output
    with safe_open(str(run / "last.ema.safetensors"), framework="pt") as f:
        assert f.metadata()["weights"] == "ema"
        for k, v in ckpt["model_ema"].items():
            assert torch.equal(f.get_tensor(k), v), k

    del ckpt["model_ema"]   # as a run without --model-ema saves it
    torch.save(ckpt, tmp_path / "raw.pt")
    for cmd in (["eval", val, "--checkpoint", tmp_path / "raw.pt"], ["export", tmp_path / "raw.pt", "--format",
                                                                    "safetensors"]):
        refused = invoke(*cmd, "--ema")
        assert isinstance(refused.exception, MealV2Error), refused.output
        assert "raw.pt holds no EMA weights (its run was trained without --model-ema)" in str(refused.exception)
    plain = invoke("eval", val, "--checkpoint", labelled.work / "teacher.pth", "-a", "test_resnet", "--res", 32,
                   "--ema")
    assert "is a plain state dict, which has none: leave --ema out" in str(plain.exception)
    timm_weights = invoke("eval", val, "-a", "test_resnet", "--pretrained", "--ema")
    assert "-a test_resnet --pretrained (timm's weights) has none: leave --ema out" in str(timm_weights.exception)
    bare = invoke("train", labelled.data, "--labels", labelled.store, "-a", "test_resnet", "-o", tmp_path / "x",
                  "--model-ema-decay", 0.9, *FAST)
    assert isinstance(bare.exception, MealV2Error) and "--model-ema-decay 0.9 applies with --model-ema only" in str(
        bare.exception)
    with pytest.raises(MealV2Error, match=r"--model-ema-decay 1: .* must be in \[0, 1\)"):
        TrainConfig(data="d", out="o", arch="a", hard_labels=True, model_ema=True, model_ema_decay=1.0)


def test_model_ema_leaves_the_raw_run_as_it_was(labelled, tmp_path, monkeypatch):
    from mealv2.stage2_train import validate

    monkeypatch.setattr(validate, "CACHE_BYTES", 0)   # every validation reads the files through a DataLoader
    val = make_image_dataset(tmp_path / "val", num_classes=3, per_class=2, seed=7)
    runs = [config(labelled, tmp_path / str(ema), epochs=1, model_ema=ema, val=str(val)) for ema in (False, True)]
    rows = [train(cfg) for cfg in runs]
    assert [r[0]["loss"] for r in rows] == [rows[0][0]["loss"]] * 2 and rows[1][0]["val_ema_top1"] is not None
    # torch's RNG (dropout, drop-path in later epochs) is where the run without EMA left it
    plain, ema = (load_checkpoint_file(tmp_path / str(e) / "last.pt")["rng"][0]["torch"] for e in (False, True))
    assert torch.equal(plain, ema)


@pytest.mark.slow
def test_ddp_two_processes_take_equal_steps_and_validate_as_one(labelled, tmp_path, cli):
    run = tmp_path / "run"
    val = make_image_dataset(tmp_path / "val", num_classes=3, per_class=3, seed=5)   # 9: ranks score 5 and 4
    # 12 images, 4 per step and rank on 2 ranks: 2 steps each, the second padded by wrapping around.
    # MEALV2_CHECK_COLLECTIVES=cuda: every collective's tensor must have a backend in a CUDA run's group.
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2,
            "-m", "mealv2.cli", "train", labelled.data, "--labels", labelled.store, "-a", "test_resnet",
            "-o", run, "--epochs", 2, "--use-discriminator-loss", "--model-ema", "--model-ema-decay", 0.5, "--val", val,
            *FAST]
    r = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=300,
                       env={**os.environ, **ONE_THREAD, "MEALV2_CHECK_COLLECTIVES": "cuda"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("steps per rank [2, 2]") == 2
    assert "2 rank(s)" in r.stdout
    rows = assert_run_outputs(run, 2, "test_resnet", val=True)
    assert len(load_checkpoint_file(run / "last.pt")["rng"]) == 2
    single = cli("eval", val, "--checkpoint", run / "last.pt", "--json", "--device", "cpu", "--workers", 1)
    assert single.returncode == 0, single.stderr
    stats = json.loads(single.stdout)
    assert (float(rows[-1]["val_top1"]), float(rows[-1]["val_top5"])) == (stats["top1"], stats["top5"])
    # The EMA weights too: their BatchNorm statistics are rank 0's, the ones last.pt keeps.
    ema = cli("eval", val, "--checkpoint", run / "last.pt", "--ema", "--json", "--device", "cpu", "--workers", 1)
    assert ema.returncode == 0, ema.stderr
    stats = json.loads(ema.stdout)
    assert stats["ema"] and (float(rows[-1]["val_ema_top1"]), float(rows[-1]["val_ema_top5"])) == (stats["top1"],
                                                                                                   stats["top5"])


def test_curves_are_redrawn_at_most_every_30_s_and_after_the_last_epoch(tmp_path, monkeypatch):
    from mealv2.stage2_train import utils

    clock, drawn = [100.0], []
    monkeypatch.setattr(utils.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(utils, "plot_curves", lambda rows, path: drawn.append(len(rows)))
    log = utils.RunLog(tmp_path)
    rows = []
    for epoch, (seconds, final) in enumerate([(1, False), (10, False), (25, False), (1, False), (1, True)]):
        clock[0] += seconds
        rows.append({"epoch": epoch, "loss": 1.0})
        log.write(rows, final=final)
        assert len(read_metrics(tmp_path)) == epoch + 1, "metrics.csv is rewritten every epoch"
    assert drawn == [1, 3, 5], "the first epoch, once 30 s have passed, and the last"
