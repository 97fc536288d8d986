"""--hard-label-weight A: loss = A * CE(dataset labels) + (1 - A) * (KD + discriminator), in all three doors
(TrainConfig / `mealv2 train`, stored and online; ReplayLoader + MealV2Loss), with the labels mixed by
CutMix/mixup as the soft targets are, and refused where it cannot apply."""
from __future__ import annotations

import csv
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F

import mealv2
from mealv2.common.errors import MealV2Error
from mealv2.common.models.checkpoints import load_checkpoint_file
from mealv2.stage2_train.loader import epoch_order
from mealv2.stage2_train.losses import Discriminator, discriminator_loss, objective_losses, soft_cross_entropy

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = ["--device", "cpu", "--workers", "2", "--batch-size", "8"]


def _batch(n=8, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, requires_grad=True)
    target = torch.softmax(torch.randn(n, k, generator=g), 1)
    labels = torch.randint(0, k, (n,), generator=g)
    return logits, target, labels


@pytest.mark.parametrize("weight", [0.0, 0.25, 1.0])
def test_the_loss_is_the_weighted_sum_and_the_discriminator_stays_on_the_distillation_side(weight):
    logits, target, labels = _batch()
    torch.manual_seed(0)
    disc = Discriminator(5)
    loss, d_loss = objective_losses(logits, target, 2.0, disc, 3, labels=labels, hard_label_weight=weight)
    kd = soft_cross_entropy(logits, target, 2.0)
    torch.testing.assert_close(loss, weight * F.cross_entropy(logits, labels) + (1 - weight) * kd)
    torch.testing.assert_close(d_loss, (1 - weight) * discriminator_loss(disc, logits, target, 2.0, 3))
    # A = 0 is MEAL V2's objective exactly, labels or not
    assert torch.equal(objective_losses(logits, target, 2.0, labels=labels)[0], kd)


def test_mealv2_loss_takes_the_weight_and_refuses_what_cannot_train():
    logits, target, labels = _batch()
    criterion = mealv2.MealV2Loss(5, hard_label_weight=0.5)
    loss = criterion(logits, target, labels)
    torch.testing.assert_close(loss, 0.5 * F.cross_entropy(logits, labels) + 0.5 * soft_cross_entropy(logits, target))
    assert torch.equal(criterion.kd_loss, loss.detach()) and criterion.d_loss is None
    with pytest.raises(MealV2Error, match=r"hard_label_weight 0.5 weighs the dataset's labels in, but no labels .*"
                                          r"hard_labels=True"):
        criterion(logits, target)
    for bad in (1.5, -0.1):
        with pytest.raises(MealV2Error, match=rf"MealV2Loss: hard_label_weight = {bad} is out of range; expected a "
                                              rf"finite number in \[0, 1\]"):
            mealv2.MealV2Loss(5, hard_label_weight=bad)
    with pytest.raises(MealV2Error, match="hard_label_weight = nan is not a finite number"):
        mealv2.MealV2Loss(5, hard_label_weight=math.nan)


@pytest.mark.parametrize("kind", [dict(cutmix_alpha=1.0), dict(mixup_alpha=0.4)])
def test_mixing_mixes_the_labels_by_the_same_draw_as_the_soft_targets(kind):
    _, _, labels = _batch()
    images = torch.randn(8, 3, 16, 16)
    one_hot = F.one_hot(labels, 5).float()
    # soft targets that are the labels' one-hot rows: mixed by the same draw, they must stay equal
    mixed_images, mixed_targets, mixed_labels = mealv2.mix_batch(images, one_hot, labels, seed=3, step=1, shift=2,
                                                                 **kind)
    assert not torch.equal(mixed_images, images) and mixed_labels.shape == (8, 5)
    torch.testing.assert_close(mixed_labels, mixed_targets)
    assert not torch.equal(mixed_labels, one_hot)
    alone, = mealv2.mix_batch(images, seed=3, step=1, shift=2, **kind)
    assert torch.equal(alone, mixed_images)          # the draw is the seed's, whatever is mixed with the images
    with pytest.raises(MealV2Error, match="integer targets .* need num_classes="):
        mealv2.mix_batch(images, labels, seed=3, step=1, shift=2, **kind)


# ------------------------------------------------------------------------------------- the config and the CLI
REFUSALS = {
    "with --hard-labels": (["--hard-labels", "--hard-label-weight", "0.5"], dict(hard_labels=True, hard_label_weight=0.5),
                           "--hard-label-weight 0.5 weighs the dataset's labels in beside soft targets, and "
                           "--hard-labels trains on those labels alone already; drop --hard-label-weight"),
    "discriminator at 1": (["-t", "t", "--use-discriminator-loss", "--hard-label-weight", "1"],
                           dict(teachers=["t"], use_discriminator_loss=True, hard_label_weight=1.0),
                           "--use-discriminator-loss with --hard-label-weight 1: the discriminator's term is on the "
                           "distillation side, which weighs 1 - 1 = 0"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_the_weight_is_refused_where_it_cannot_apply_by_cli_and_config(case, tmp_path, in_process):
    args, fields, message = REFUSALS[case]
    with pytest.raises(MealV2Error, match=f"^train: {re.escape(message)}"):
        mealv2.TrainConfig(data="d", out="o", arch="a", **fields)
    (tmp_path / "data").mkdir()
    r = in_process("train", tmp_path / "data", "-o", tmp_path / "run", "-a", "test_resnet", *args)
    assert r.returncode != 0 and message in r.stderr, r.stderr


@pytest.mark.parametrize("value", [math.nan, math.inf, 1.5, -0.5])
def test_a_weight_outside_0_1_or_not_finite_is_refused_by_the_config(value):
    with pytest.raises(MealV2Error, match="hard_label_weight = .* (is not a finite number|is out of range; expected "
                                          "a finite number in \\[0, 1\\])"):
        mealv2.TrainConfig(data="d", out="o", arch="a", labels="s", hard_label_weight=value)


# ------------------------------------------------------------------------------------- training
def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _same_training(a: Path, b: Path) -> None:
    """Same loss every epoch and the same final weights."""
    assert [r["loss"] for r in _metrics(a)] == [r["loss"] for r in _metrics(b)]
    wa, wb = (load_checkpoint_file(run / "last.pt")["model"] for run in (a, b))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_at_weight_1_stored_and_online_runs_train_what_hard_labels_trains_on_the_same_crops(labelled, tmp_path,
                                                                                            in_process):
    """Round p of the store holds the crops a hard-label run of the seed draws in pass p: at A = 1 the soft
    targets weigh nothing, so a stored and an online run must train exactly the hard-label run, CutMix
    included; the labels are the crops' own (in order) and mixed as hard-label mode mixes them."""
    common = ["-a", "test_resnet", "--epochs", 3, "--w-cutmix", *FAST]   # 3 epochs = 2 passes = the store's rounds
    fresh = ["--res", 32, "--crops-per-image", 2]
    runs = {"hard": ["--hard-labels", *fresh], "stored": ["--labels", labelled.store, "--hard-label-weight", 1],
            "online": ["--teachers", labelled.teacher, "--no-teacher-check", "--hard-label-weight", 1, *fresh]}
    for name, args in runs.items():
        r = in_process("train", labelled.data, "-o", tmp_path / name, *args, *common)
        assert r.returncode == 0, r.stderr
        if name != "hard":
            assert "loss: 1 x cross-entropy on the dataset's labels + 0 x (distillation) (--hard-label-weight 1)" \
                   in r.stdout
    _same_training(tmp_path / "stored", tmp_path / "hard")
    _same_training(tmp_path / "online", tmp_path / "hard")
    # ... and A = 0.5 trains something else (the labels are not ignored, nor the targets)
    r = in_process("train", labelled.data, "-o", tmp_path / "half", "--labels", labelled.store,
                   "--hard-label-weight", 0.5, *common)
    assert r.returncode == 0, r.stderr
    plain = [r["loss"] for r in _metrics(tmp_path / "half")]
    assert plain != [r["loss"] for r in _metrics(tmp_path / "hard")]


def _replay(labelled, **kw) -> "mealv2.ReplayLoader":
    return mealv2.ReplayLoader(labelled.store, labelled.data, batch_size=8, mean=(0.5,) * 3, std=(0.5,) * 3,
                               device="cpu", workers=1, **kw)


def test_the_replay_loader_yields_each_crops_label_when_asked(labelled):
    index_labels = mealv2.ReplayLoader(labelled.store, labelled.data, batch_size=8, mean=(0.5,) * 3,
                                       std=(0.5,) * 3, device="cpu", workers=1).index.labels
    plain = _replay(labelled, seed=2)
    with_labels = _replay(labelled, seed=2, hard_labels=True)
    order = epoch_order(12, 4, 2, 0)    # 12 images, 4 per step (8 crops of 2 per image), seed 2, pass 0
    for step, ((images, targets), (images_l, targets_l, labels)) in enumerate(zip(plain, with_labels)):
        assert torch.equal(images, images_l) and torch.equal(targets, targets_l)
        assert labels.dtype == torch.int64 and labels.tolist() == np.repeat(index_labels[order[step]], 2).tolist()


@pytest.mark.slow
def test_the_python_loop_trains_what_mealv2_train_trains_with_the_weight(labelled, tmp_path):
    """ReplayLoader(hard_labels=True) + loader.mix + MealV2Loss(hard_label_weight=0.5), discriminator and
    CutMix on: the same loss and d_loss every epoch and the same weights as TrainConfig(hard_label_weight=0.5)."""
    epochs = 3
    rows = mealv2.train(mealv2.TrainConfig(str(labelled.data), str(tmp_path / "run"), "test_resnet",
                                           labels=str(labelled.store), epochs=epochs, batch_size=24,
                                           use_discriminator_loss=True, w_cutmix=True, hard_label_weight=0.5,
                                           device="cpu", workers=2, progress=False))
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    loader = mealv2.ReplayLoader(labelled.store, labelled.data, batch_size=24, model=model, device="cpu",
                                 workers=2, hard_labels=True)
    model.train()
    criterion = mealv2.MealV2Loss(loader.num_classes, temperature=loader.temperature, topk=loader.topk,
                                  discriminator=True, hard_label_weight=0.5)
    optimizer = timm.optim.create_optimizer_v2(model, opt="momentum", lr=0.01, momentum=0.9, weight_decay=0.0)
    ours = []
    for _ in range(epochs):
        for images, targets, labels in loader:      # 24 crops = the whole pass: one step per epoch
            images, targets, labels = loader.mix(images, targets, labels, cutmix_alpha=1.0)
            loss = criterion(model(images), targets, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            criterion.step()
        ours += [float(criterion.kd_loss), float(criterion.d_loss)]
    assert ours == pytest.approx([row[k] for row in rows for k in ("loss", "d_loss")], abs=1e-5)
    cli_model = load_checkpoint_file(tmp_path / "run" / "last.pt")["model"]
    for name, value in cli_model.items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def unlabelled_store(labelled, tmp_path_factory):
    """The fixture images as loose files (no labels), labelled by the fixture's teacher."""
    work = tmp_path_factory.mktemp("unlabelled-store")
    loose = work / "loose"
    loose.mkdir()
    for image in sorted(Path(labelled.data).rglob("*.jpg")):
        shutil.copy(image, loose / f"{image.parent.name}_{image.name}")
    (work / "names.txt").write_text("class_0\nclass_1\nclass_2\n")
    mealv2.label(mealv2.LabelConfig(str(loose), [labelled.teacher], str(work / "store"), rounds=1, crops_per_image=2,
                                    res=32, topk=2, batch_size=8, workers=1, device="cpu",
                                    classes_file=str(work / "names.txt"), progress=False))
    return work


@pytest.mark.slow
def test_a_store_of_unlabelled_images_is_refused_naming_the_fix(unlabelled_store, tmp_path, in_process):
    store, loose = unlabelled_store / "store", unlabelled_store / "loose"
    message = ("was labelled from images without labels (a folder of loose images or a CSV without a 'label' "
               "column), so there are no hard labels to weigh in")
    r = in_process("train", loose, "--labels", store, "-o", tmp_path / "run", "-a", "test_resnet",
                   "--hard-label-weight", 0.5, "--dry-run", *FAST)
    assert r.returncode != 0 and f"--hard-label-weight 0.5: {store}" in r.stderr and message in r.stderr, r.stderr
    assert "label the images as an ImageFolder or a CSV with a 'label' column" in r.stderr
    with pytest.raises(MealV2Error, match=r"ReplayLoader\(hard_labels=True\): .*" + re.escape(message)):
        mealv2.ReplayLoader(store, loose, batch_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, device="cpu",
                            hard_labels=True)
    # without the weight the same store trains (its soft targets alone)
    r = in_process("train", loose, "--labels", store, "-o", tmp_path / "run", "-a", "test_resnet", "--dry-run", *FAST)
    assert r.returncode == 0, r.stderr
