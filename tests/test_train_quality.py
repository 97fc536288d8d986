"""Stored soft labels beat hard labels on the same data and budget.

Set-up, sized to be stable rather than flattering: the teacher is trained (with --hard-labels)
on a clean split; the students train on a *different* split whose dataset labels are 5/12 wrong
(pair flips: some images of class c are filed under class c + 1, so the true class still holds
the majority); both students are validated on a third, clean split of 96 images. 24 epochs of N
crops (rounded up to whole steps of 32 crops) at 4 crops per image are 8 passes over the images. The stored-label student never sees the
dataset labels, only the teacher's soft labels of its crops; the hard-label student fits the noisy
labels. Same architecture, seed, crops, epochs, batch and schedule.

How much the noise hurts the hard-label student depends on the images drawn (on one draw it is not
hurt at all, on others it loses 7 to 24 points; BENCHMARKS has no figure for it, the spread is here):
so the claim is checked over three draws, as never worse on any and better on average.
"""
from pathlib import Path

import pytest

from conftest import make_image_dataset
from mealv2.common.data.crops import CropParams
from mealv2.stage1_label.config import LabelConfig
from mealv2.stage1_label.labeler import run_label
from mealv2.stage2_train.config import TrainConfig
from mealv2.stage2_train.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES, PER_CLASS, FLIPPED = 4, 12, 5
CROP = CropParams(res=32, scale=(0.35, 1.0))
FRESH_CROP = dict(res=CROP.res, scale=CROP.scale, ratio=CROP.ratio)   # TrainConfig's crop fields


def flip_labels(root: Path) -> None:
    """File the last FLIPPED images of class c under class c + 1."""
    for c in range(CLASSES):
        for f in sorted((root / f"class_{c}").iterdir())[-FLIPPED:]:
            f.rename(root / f"class_{(c + 1) % CLASSES}" / f"from{c}_{f.name}")


def students(root: Path, seed: int) -> tuple[float, float]:
    """Val top-1 of the stored-label and the hard-label student on the draw of images ``seed``."""
    split = dict(num_classes=CLASSES, size_range=(40, 64))
    clean = make_image_dataset(root / "clean", per_class=PER_CLASS, seed=seed + 1, **split)
    noisy = make_image_dataset(root / "noisy", per_class=PER_CLASS, seed=seed + 2, **split)
    val = make_image_dataset(root / "val", per_class=24, seed=seed + 3, **split)
    flip_labels(noisy)
    common = dict(arch="test_resnet", batch_size=32, epochs=24, lr=0.05, cos=True, val=str(val), seed=0,
                  workers=2, device="cpu", progress=False)

    teacher = train(TrainConfig(data=str(clean), out=str(root / "teacher"), hard_labels=True, **FRESH_CROP,
                                **common))
    assert teacher[-1]["val_top1"] >= 80
    run_label(LabelConfig(data=str(noisy), teachers=[str(root / "teacher" / "last.pt")],
                          out=str(root / "store"), rounds=2, **FRESH_CROP, crops_per_image=4, topk=CLASSES,
                          workers=2, device="cpu", progress=False))

    stored = train(TrainConfig(data=str(noisy), out=str(root / "stored"), labels=str(root / "store"),
                               **common))
    hard = train(TrainConfig(data=str(noisy), out=str(root / "hard"), hard_labels=True, **FRESH_CROP, **common))
    print(f"images {seed}: val top-1: teacher {teacher[-1]['val_top1']:.1f}, stored labels "
          f"{stored[-1]['val_top1']:.1f}, hard labels {hard[-1]['val_top1']:.1f}")
    return stored[-1]["val_top1"], hard[-1]["val_top1"]


@pytest.mark.slow
def test_stored_labels_beat_hard_labels_on_noisy_data(tmp_path):
    runs = [students(tmp_path / str(seed), seed) for seed in (100, 200, 300)]
    for stored, hard in runs:
        assert stored >= 85 and stored >= hard, runs
    assert sum(stored - hard for stored, hard in runs) / len(runs) >= 5, runs
