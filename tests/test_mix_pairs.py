"""CutMix and mixup never silently do nothing: a crop is paired with the same crop of another
image of its rank's step, and a batch that leaves one image per rank and step is refused."""
from __future__ import annotations

import pytest

from mealv2.common.errors import MealV2Error
from mealv2.stage2_train.config import TrainConfig
from mealv2.stage2_train.trainer import train

ARGS = ["--hard-labels", "-a", "test_resnet", "--res", 32, "--crops-per-image", 2, "--device", "cpu",
        "--loader", "torch", "--workers", 1, "--dry-run"]


def test_one_image_per_rank_and_step_is_refused_naming_the_batch_that_pairs(tiny_data, tmp_path, in_process):
    r = in_process("train", tiny_data, "-o", tmp_path / "run", "--w-cutmix", "--batch-size", 2, *ARGS)
    assert r.returncode == 2, r.stdout
    assert "--w-cutmix mixes each crop with the same crop of another image" in r.stderr
    assert "gives each rank 1 image per step: every crop would be mixed with itself" in r.stderr
    assert "Use --batch-size 4 or more" in r.stderr
    cfg = dict(data=str(tiny_data), out=str(tmp_path / "run"), arch="test_resnet", hard_labels=True,
               crops_per_image=2, device="cpu", loader="torch", workers=1, dry_run=True, progress=False)
    with pytest.raises(MealV2Error, match="--mixup 0.2 mixes each crop"):
        train(TrainConfig(**cfg, batch_size=2, mixup=0.2))
    assert train(TrainConfig(**cfg, batch_size=2)) == []             # no mixing: one image per step is fine
    assert train(TrainConfig(**cfg, batch_size=4, w_cutmix=True)) == []
