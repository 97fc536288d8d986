"""The public Python API (mealv2/__init__.py): README's loop as written trains what `mealv2 train` trains,
the replay loader refuses what `mealv2 train` refuses and resumes mid-epoch, and the DDP example runs."""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mealv2
from mealv2.common.data.dataset import DatasetError
from mealv2.common.errors import MealV2Error
from mealv2.common.models.checkpoints import load_checkpoint_file

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SETTINGS = ('DATA, STORE, ARCH, EPOCHS, BATCH, CKPT = "imagenet/train", "labels.zarr", "resnet50", 180, 512, '
            '"student.pt"')

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def readme_loop() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_readme_loop(cwd: Path, epochs: int, batch: int) -> list[str]:
    """README's block as written, but for its settings line (the test's data, a tiny model, few epochs)."""
    code = readme_loop()
    assert code.count(SETTINGS) == 1, "README's settings line changed: update SETTINGS"
    code = code.replace(SETTINGS, f'DATA, STORE, ARCH, EPOCHS, BATCH, CKPT = "data", "labels.zarr", "test_resnet", '
                                  f'{epochs}, {batch}, "student.pt"')
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.splitlines()


def loader(labelled, **kw) -> "mealv2.ReplayLoader":
    kw = {"batch_size": 8, "mean": (0.5,) * 3, "std": (0.5,) * 3, "device": "cpu", "workers": 1, **kw}
    return mealv2.ReplayLoader(labelled.store, labelled.data, **kw)


@pytest.mark.slow
def test_the_readme_loop_trains_what_mealv2_train_trains_and_resumes(labelled, tmp_path, in_process):
    """Same crops, targets, mixing and discriminator: the losses of every epoch and the final weights agree.
    The loop is run for 2 epochs, then again with 3: the second run resumes from its checkpoint."""
    (tmp_path / "data").symlink_to(labelled.data)
    (tmp_path / "labels.zarr").symlink_to(labelled.store)
    # 24 crops per step = one pass of 12 images x 2 crops: an epoch is one step, so its loss is the step's.
    first = run_readme_loop(tmp_path, epochs=2, batch=24)
    resumed = run_readme_loop(tmp_path, epochs=3, batch=24)
    assert [line.split(":")[0] for line in first + resumed] == ["epoch 0", "epoch 1", "epoch 2"]
    r = in_process("train", labelled.data, "--labels", labelled.store, "-a", "test_resnet", "-o", tmp_path / "run",
                   "--epochs", 3, "--batch-size", 24, "--use-discriminator-loss", "--w-cutmix", "--device", "cpu",
                   "--workers", 2)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    ours = [float(v) for line in first + resumed for v in re.findall(r"loss (\S+)", line)]
    assert ours == pytest.approx([float(r[k]) for r in rows for k in ("loss", "d_loss")], abs=1e-5)
    cli_model = load_checkpoint_file(tmp_path / "run" / "last.pt")["model"]
    loop = torch.load(tmp_path / "student.pt", weights_only=True)
    for name, value in cli_model.items():
        torch.testing.assert_close(loop["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert loop["loader"]["step"] == 3


def test_the_replay_loader_resumes_mid_epoch_exactly(labelled):
    straight = loader(labelled, seed=3)
    assert len(straight) == 2   # 12 images x 2 crops in steps of 8 crops: epochs of round(12 / 8) steps
    batches = [b for _ in range(3) for b in straight]       # three epochs: passes 0, 1 and half of 2
    assert straight.step == 6 and straight.epoch == 3
    assert [t.shape for _, t in batches] == [(8, 3)] * 6 and batches[0][0].shape == (8, 3, 32, 32)
    stopped = loader(labelled, seed=3)
    list(stopped)
    next(iter(stopped))                                     # stop after the first step of epoch 1
    state = stopped.state_dict()
    resumed = loader(labelled, seed=3)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    rest = list(resumed) + list(resumed)
    assert len(rest) == 3
    for (images, targets), (want_images, want_targets) in zip(rest, batches[3:]):
        torch.testing.assert_close(images, want_images)
        torch.testing.assert_close(targets, want_targets)
    with pytest.raises(MealV2Error, match=r"seed: the saved loader has 3, this one 0"):
        loader(labelled).load_state_dict(state)


def test_the_replay_loader_takes_the_models_normalisation_and_any_res(labelled):
    model = timm.create_model("test_resnet", num_classes=3)
    default = loader(labelled, mean=None, std=None, model=model)
    assert (default.mean, default.std) == (model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    assert default.res == 32 and default.temperature == 1.0 and default.topk == 2
    images, targets = next(iter(loader(labelled, res=48)))
    assert images.shape == (8, 3, 48, 48)
    assert torch.allclose(targets.sum(1), torch.ones(8), atol=1e-3)
    with pytest.raises(MealV2Error, match=r"the model has 5 outputs, .* 3 classes \['class_0'.*num_classes="):
        loader(labelled, model=timm.create_model("test_resnet", num_classes=5))
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=3)
    with pytest.raises(MealV2Error, match="the model cannot take the student's 32 px input .*224 px .*res="):
        loader(labelled, model=vit)
    with pytest.raises(MealV2Error, match="pass model= .* or mean= and std="):
        loader(labelled, mean=None, std=None)


def test_the_replay_loader_refuses_what_mealv2_train_refuses(labelled, tmp_path):
    with pytest.raises(MealV2Error, match="loader = .nope. is not a choice; expected one of .auto."):
        loader(labelled, loader="nope")
    with pytest.raises(MealV2Error, match=r"crops_per_image=4 differs from the 2 that .* was labelled with"):
        loader(labelled, crops_per_image=4)
    assert loader(labelled, crops_per_image=2, scale=(0.08, 1.0)).crops_per_image == 2
    with pytest.raises(MealV2Error, match="is not a multiple of 2 crops per image"):
        loader(labelled, batch_size=7)

    other = shutil.copytree(labelled.data, tmp_path / "other")
    shutil.copy(other / "class_0" / "img_03.jpg", other / "class_0" / "img_99.jpg")
    with pytest.raises(MealV2Error, match=r"fingerprint [0-9a-f]{16} \(12 images\).*\(13 images\)"):
        mealv2.ReplayLoader(labelled.store, other, batch_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, device="cpu")

    incomplete = shutil.copytree(labelled.store, tmp_path / "incomplete")
    (incomplete / "done" / "c" / "1" / "0").unlink()
    with pytest.raises(MealV2Error, match="only 1/2 label rounds are complete"):
        mealv2.ReplayLoader(incomplete, labelled.data, batch_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, device="cpu")

    changed = shutil.copytree(labelled.data, tmp_path / "changed")
    target = changed / "class_1" / "img_03.jpg"
    with Image.open(target) as im:
        im.rotate(180).save(target, quality=80)       # same name: the fingerprint cannot see it, the CRC32C can
    replay = mealv2.ReplayLoader(labelled.store, changed, batch_size=24, mean=(0.5,) * 3, std=(0.5,) * 3,
                                 device="cpu", loader="torch")
    with pytest.raises(DatasetError, match="img_03.jpg: the file changed since"):
        list(replay)


def test_the_objective_and_mixing(labelled):
    replay = loader(labelled)
    images, targets = next(iter(replay))
    mixed, mixed_targets = replay.mix(images, targets, cutmix_alpha=1.0)
    assert not torch.equal(mixed, images) and torch.allclose(mixed_targets.sum(1), torch.ones(8), atol=1e-3)
    assert replay.mix(images, targets) == (images, targets)            # nothing asked: unchanged
    with pytest.raises(MealV2Error, match="mixes every crop with itself"):
        mealv2.mix_batch(images[:2], targets[:2], seed=0, step=0, shift=2, cutmix_alpha=1.0)

    torch.manual_seed(0)
    criterion = mealv2.MealV2Loss(3, temperature=2.0, topk=2, discriminator=True)
    logits = torch.randn(8, 3, requires_grad=True)
    loss = criterion(logits, targets)
    torch.testing.assert_close(loss, criterion.kd_loss + criterion.d_loss)
    loss.backward()
    before = [p.detach().clone() for p in criterion.discriminator.parameters()]
    criterion.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, criterion.discriminator.parameters()))
    again = mealv2.MealV2Loss(3, temperature=2.0, topk=2, discriminator=True)
    again.load_state_dict(criterion.state_dict())
    assert again.d_optimizer.state_dict()["state"].keys() == criterion.d_optimizer.state_dict()["state"].keys()
    with pytest.raises(MealV2Error, match="temperature = 0.0; expected a positive"):
        mealv2.MealV2Loss(3, temperature=0.0)


def test_the_public_api_is_documented_and_import_stays_light():
    r = subprocess.run([sys.executable, "-c", "import sys, mealv2; print('torch' in sys.modules)"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.stdout.strip() == "False", r.stderr
    for name in mealv2.__all__:
        if name == "__version__":
            continue
        doc = getattr(mealv2, name).__doc__
        assert "Args:" in doc and "Example::" in doc, name


@pytest.mark.slow
def test_the_ddp_example_trains_what_mealv2_train_trains_on_two_gloo_ranks(labelled, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT), "MEALV2_CHECK_COLLECTIVES": "cuda"}
    flags = ["--epochs", "2", "--batch-size", "8"]
    r = subprocess.run([*torchrun, str(ROOT / "examples" / "ddp_train.py"), str(labelled.data), str(labelled.store),
                        "test_resnet", "--out", str(tmp_path / "ddp.pt"), *flags, "--workers", "1"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("epoch ") == 2, r.stdout          # printed by rank 0 only
    r = subprocess.run([*torchrun, "-m", "mealv2.cli", "train", str(labelled.data), "--labels", str(labelled.store),
                        "-a", "test_resnet", "-o", str(tmp_path / "run"), *flags, "--use-discriminator-loss",
                        "--w-cutmix", "--device", "cpu", "--workers", "1"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ours = torch.load(tmp_path / "ddp.pt", weights_only=True)
    theirs = load_checkpoint_file(tmp_path / "run" / "last.pt")
    for name, value in theirs["model"].items():
        torch.testing.assert_close(ours["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    for name, value in theirs["discriminator"].items():
        torch.testing.assert_close(ours["criterion"][f"discriminator.{name}"], value, rtol=1e-4, atol=1e-5, msg=name)
    assert np.isclose(ours["loader"]["step"], 4)
