"""One store, students at any resolution; progressive resizing in every mode; their refusals."""
import csv
import json
from types import SimpleNamespace

import pytest
import timm
import torch

from mealv2.common.errors import MealV2Error
from mealv2.common.models.checkpoints import load_checkpoint_file
from mealv2.common.store.label_store import LabelStore
from mealv2.common.models.teachers import Ensemble
from mealv2.stage1_label.config import LabelConfig
from mealv2.stage1_label.labeler import run_label
from mealv2.stage2_train import trainer
from mealv2.stage2_train.loader import StoredLabels, epoch_order
from mealv2.stage2_train.res_schedule import ResSchedule, res_schedule
from mealv2.stage2_train.config import TrainConfig
from mealv2.stage2_train.trainer import train

FAST = ["--device", "cpu", "--workers", "2", "--batch-size", "8"]
STORE_RES = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store32(tiny_data, tmp_path_factory):
    """tiny_data labelled at 32 px: 2 rounds x 2 crops, top-2, by a random test_resnet."""
    work = tmp_path_factory.mktemp("student_res")
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), work / "teacher.pth")
    teacher = f"test_resnet={work / 'teacher.pth'}@{STORE_RES}"
    run_label(LabelConfig(data=str(tiny_data), teachers=[teacher], out=str(work / "store"), rounds=2,
                          crops_per_image=2, res=STORE_RES, topk=2, batch_size=8, workers=2,
                          device="cpu", teacher_check=False, progress=False))
    return SimpleNamespace(data=tiny_data, store=work / "store", teacher=teacher)


def config(store32, out, **kw) -> TrainConfig:
    return TrainConfig(**{"data": str(store32.data), "out": str(out), "arch": "test_resnet",
                          "labels": str(store32.store), "batch_size": 8, "workers": 2, "device": "cpu",
                          "progress": False, **kw})


def student_at(res: int) -> dict:
    """TrainConfig fields of a given --res."""
    return dict(res=res)


def metrics_res(run) -> list[int]:
    with open(run / "metrics.csv") as f:
        return [int(row["res"]) for row in csv.DictReader(f)]


@pytest.fixture
def recorded_steps(monkeypatch):
    """(student images, target) of every training step, as train_step receives them."""
    seen = []
    step = trainer.train_step

    def record(state, images, target, *args, **kw):
        seen.append((images.detach().clone(), None if target is None else target.detach().clone()))
        return step(state, images, target, *args, **kw)

    monkeypatch.setattr(trainer, "train_step", record)
    return seen


def test_schedule_is_a_pure_function_of_the_epoch():
    s = ResSchedule(224, min_res=128, ramp_start=2, ramp_end=6, step=32)
    # linear from 128 (epoch 2) to 224 (epoch 6), rounded down to multiples of 32: 152, 176, 200 -> 128, 160, 192
    assert [s.at(e) for e in range(9)] == [128, 128, 128, 128, 160, 192, 224, 224, 224]
    assert s.describe(9) == "epochs 0-3: 128 px, 4: 160 px, 5: 192 px, 6-8: 224 px"
    assert s.pixel_fraction(9) == pytest.approx((4 * 128**2 + 160**2 + 192**2 + 3 * 224**2) / (9 * 224**2))
    # a final res that is no multiple of the step is still reached after the ramp; the start is kept
    odd = ResSchedule(200, min_res=100, ramp_start=0, ramp_end=4, step=32)
    assert [odd.at(e) for e in range(5)] == [100, 100, 128, 160, 200]
    assert [ResSchedule(160).at(e) for e in (0, 50)] == [160, 160]


@pytest.mark.parametrize("kw, message", [
    (dict(min_res=256, ramp_start=0, ramp_end=5), r"--min-res 256 is above the final resolution 224 px \(--res\)"),
    (dict(min_res=128, ramp_start=5, ramp_end=3), r"--ramp-start 5 is after --ramp-end 3"),
    (dict(min_res=128, ramp_start=2, ramp_end=11), r"--ramp-end 11 is beyond --epochs 10"),
    (dict(min_res=128, ramp_end=5), r"--min-res 128 needs --ramp-start E .* and --ramp-end E"),
    (dict(ramp_start=1, ramp_end=5), r"--ramp-start 1 shapes a progressive resolution schedule, which needs "
                                     r"--min-res"),
    (dict(res_step=16), r"--res-step 16 shapes a progressive"),
    (dict(min_res=128, ramp_start=-1, ramp_end=5), r"--ramp-start -1: expected an epoch >= 0"),
    (dict(min_res=128, ramp_start=1, ramp_end=5, res_step=0), r"--res-step 0: expected a positive"),
])
def test_bad_schedules_are_refused_naming_flag_and_value(kw, message):
    args = {"min_res": None, "ramp_start": None, "ramp_end": None, "res_step": None, **kw}
    with pytest.raises(MealV2Error, match=message):
        res_schedule(224, 10, args["min_res"], args["ramp_start"], args["ramp_end"], args["res_step"])


@pytest.mark.slow
def test_one_store_trains_students_at_two_other_resolutions(store32, tmp_path, recorded_steps, capsys, in_process):
    # 48 px through the CLI (a typed --res that differs from the store's is let through)
    high = tmp_path / "high"
    r = in_process("train", store32.data, "--labels", store32.store, "-a", "test_resnet", "-o", high, "--epochs", 1,
                   "--res", 48, *FAST)
    assert r.returncode == 0, r.stderr
    assert f"student at 48 px, labels made at {STORE_RES} px" in r.stdout
    assert [tuple(images.shape) for images, _ in recorded_steps] == [(8, 3, 48, 48)] * 2
    recorded_steps.clear()
    # 24 px through train(), to see what the student is given
    low = tmp_path / "low"
    train(config(store32, low, epochs=1, **student_at(24)))
    assert f"student at 24 px, labels made at {STORE_RES} px" in capsys.readouterr().out
    for run, res in ((high, 48), (low, 24)):
        assert load_checkpoint_file(run / "last.pt")["res"] == res
        assert metrics_res(run) == [res]
    assert LabelStore.open(store32.store).attrs["crop"]["res"] == STORE_RES

    # epoch 0 = 2 steps of 4 images x 2 crops from pass 0; its targets are round 0's stored labels
    assert [tuple(images.shape) for images, _ in recorded_steps] == [(8, 3, 24, 24)] * 2
    order, replay = epoch_order(12, 4, seed=0, pass_=0), StoredLabels(LabelStore.open(store32.store)).for_pass(0)
    for j, (_, target) in enumerate(recorded_steps):
        torch.testing.assert_close(target, replay.targets(order[j]).to(torch.device("cpu")), rtol=0, atol=0)

    # eval at the checkpoint's res, and at another (FixRes: test at a higher res than trained)
    for run, args, res in ((low, [], 24), (high, ["--res", 64], 64)):
        r = in_process("eval", store32.data, "--checkpoint", run / "last.pt", "--json", "--device", "cpu",
                       "--workers", 2, *args)
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        assert result["res"] == res and result["num_images"] == 12 and 0 <= result["top1"] <= 100


@pytest.mark.slow
def test_progressive_run_ramps_and_resumes_mid_ramp_exactly(store32, tmp_path, monkeypatch, capsys):
    # final 48 px (not the store's 32), from 16 px; ramp epochs 0 -> 3 in multiples of 8: 16, 24, 32, 48
    kw = dict(epochs=4, min_res=16, ramp_start=0, ramp_end=3, res_step=8, lr=0.05, w_cutmix=True,
              **student_at(48))
    straight = train(config(store32, tmp_path / "straight", **kw))
    assert [row["res"] for row in straight] == [16, 24, 32, 48]
    assert metrics_res(tmp_path / "straight") == [16, 24, 32, 48]
    out = capsys.readouterr().out
    assert ("resolution: student at 16-48 px (progressive, multiples of 8: epoch 0: 16 px, 1: 24 px, 2: 32 px, "
            "3: 48 px; 45% of the pixels of 48 px throughout), labels made at 32 px; validation and checkpoints "
            "at 48 px") in out
    assert load_checkpoint_file(tmp_path / "straight" / "last.pt")["res"] == 48

    # interrupted (Ctrl-C) as epoch 2 starts: last.pt holds epochs 0-1, the ramp half done
    one_epoch = trainer.train_one_epoch

    def interrupt_at_2(state, loader, views, scheduler, epoch, *args):
        if epoch == 2:
            raise KeyboardInterrupt
        return one_epoch(state, loader, views, scheduler, epoch, *args)

    monkeypatch.setattr(trainer, "train_one_epoch", interrupt_at_2)
    with pytest.raises(KeyboardInterrupt):
        train(config(store32, tmp_path / "resumed", **kw))
    monkeypatch.setattr(trainer, "train_one_epoch", one_epoch)
    with pytest.raises(MealV2Error, match=r"student resolution: the run has 48 px \(epoch 0: 16 px, 1: 24 px, "
                                          r"2: 32 px, 3: 48 px\), this command 48 px \(epoch 0: 16 px, 1: 24 px, "
                                          r"2: 32 px, 3: 40 px\)"):
        train(config(store32, tmp_path / "resumed", resume=True, **{**kw, "ramp_end": 4}))
    resumed = train(config(store32, tmp_path / "resumed", resume=True, **kw))
    assert "at epoch 2" in capsys.readouterr().out
    for key in ("epoch", "res", "lr", "loss"):
        assert [row[key] for row in resumed] == pytest.approx([row[key] for row in straight], abs=1e-6), key
    a, b = (load_checkpoint_file(tmp_path / p / "last.pt")["model"] for p in ("straight", "resumed"))
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_progressive_in_hard_and_online_modes(store32, tmp_path, recorded_steps, monkeypatch):
    teacher_inputs = []
    probs = Ensemble.probs

    def record(self, views):
        teacher_inputs.append([tuple(v.shape[-2:]) for v in views])
        return probs(self, views)

    monkeypatch.setattr(Ensemble, "probs", record)
    schedule = dict(epochs=2, min_res=16, ramp_start=0, ramp_end=1, crops_per_image=2, **student_at(32))
    hard = train(config(store32, tmp_path / "hard", labels=None, hard_labels=True, loader="torch", **schedule))
    online = train(config(store32, tmp_path / "online", labels=None, teachers=[store32.teacher],
                          teacher_check=False, **schedule))
    assert [r["res"] for r in hard] == [r["res"] for r in online] == [16, 32]
    # 2 steps per epoch in each run, rendered by PIL (hard) and DALI (online): the student's view follows the
    # schedule, the teacher's stays at its 32 px
    assert [images.shape[-1] for images, _ in recorded_steps] == [16, 16, 32, 32] * 2
    assert teacher_inputs == [[(32, 32)]] * 4
    assert all(target.dtype == torch.int64 for _, target in recorded_steps[:4])   # hard: dataset labels


def test_resume_keeps_the_runs_student_res_or_names_both(store32, tmp_path, in_process):
    """--res defaults to 224 and is the store's when not typed: a run at the store's 32 px resumed with
    --res 224 once trained, validated and checkpointed at 224 px without a word."""
    run = tmp_path / "run"
    train(config(store32, run, epochs=1))
    assert load_checkpoint_file(run / "last.pt")["res"] == STORE_RES
    r = in_process("train", store32.data, "--labels", store32.store, "-a", "test_resnet", "-o", run, "--epochs", 2,
                   "--resume", "--res", 224, *FAST)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"student resolution: the run has {STORE_RES} px, this command 224 px" in r.stderr
    assert load_checkpoint_file(run / "last.pt")["epoch"] == 1
    # the same resolution, typed or not, continues
    for kw in ({}, student_at(STORE_RES)):
        assert train(config(store32, run, epochs=2, resume=True, dry_run=True, **kw)) == []

    typed = tmp_path / "typed"
    train(config(store32, typed, epochs=1, **student_at(48)))
    with pytest.raises(MealV2Error, match=rf"student resolution: the run has 48 px, this command {STORE_RES} px "
                                          rf"\(with --labels, --res defaults to the store's {STORE_RES} px; pass "
                                          rf"--res 48 to keep the run's\)"):
        train(config(store32, typed, epochs=2, resume=True, dry_run=True))
    assert train(config(store32, typed, epochs=2, resume=True, dry_run=True, **student_at(48))) == []


def test_store_crop_flags_other_than_res_are_refused(store32, tmp_path, in_process):
    r = in_process("train", store32.data, "--labels", store32.store, "-a", "test_resnet", "-o", tmp_path / "run",
                   "--scale", "0.5,1", "--res", 48, *FAST)
    assert r.returncode == 2
    assert "--scale 0.5,1 differs from the [0.08, 1.0]" in r.stderr
    assert "only --res, the student's resolution, may differ" in r.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(MealV2Error, match=r"--min-res 64 is above the final resolution 32 px \(the res .*store "
                                          r"was labelled at; --res sets another\)"):
        train(config(store32, tmp_path / "r2", epochs=4, min_res=64, ramp_start=0, ramp_end=2))
    with pytest.raises(MealV2Error, match="-a vit_tiny_patch16_224 cannot take the student's 48 px input .*"
                                          "train it at the 224 px it was built for"):
        train(config(store32, tmp_path / "r3", epochs=1, arch="vit_tiny_patch16_224", dry_run=True,
                     **student_at(48)))
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()
