"""`mealv2 bench label` runs end to end and its size/KL helpers measure what they claim."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from conftest import make_image_dataset
from mealv2.common.data.targets import encode_topk
from mealv2.benchmarks.label import (fkd_bytes_per_crop, fkd_file_bytes_per_crop, imagenet_like_case, kl_to_stored,
                                       synthetic_ensemble_probs)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_fkd_reference_counts_the_arrays_fkd_writes(k):
    """FKD_SLG/generate_soft_label.py --use_fp16 saves, per image of C crops, fp16 box coordinates (C, 4),
    bool flips (C,) and np.float16(stack([ids, values])) (C, 2, k): their payload per crop is the reference."""
    crops, rng = 4, np.random.default_rng(0)
    coords = np.float16(rng.random((crops, 4)))
    flips = rng.random(crops) < 0.5
    ids = rng.integers(0, 1000, (crops, k))
    values = np.sort(rng.random((crops, k)))[:, ::-1]
    soft = np.float16(np.stack([ids, values], axis=1))
    assert fkd_bytes_per_crop(k) == (coords.nbytes + flips.nbytes + soft.nbytes) / crops
    assert fkd_bytes_per_crop(k, fp16_coords=False) == (np.float32(coords).nbytes + flips.nbytes + soft.nbytes) / crops
    assert fkd_file_bytes_per_crop(crops, k) > fkd_bytes_per_crop(k)   # torch.save's container adds to it


def test_kl_to_stored_is_zero_for_exact_codes_and_grows_with_error():
    p = torch.tensor([[0.64, 0.25, 0.11 / 3, 0.11 / 3, 0.11 / 3]])
    ids, codes = encode_topk(p, 2)
    small = kl_to_stored(p, ids, codes)
    assert 0 <= small.item() < 1e-4
    worse = codes.clone()
    worse[0, 0] -= 20
    assert kl_to_stored(p, ids, worse).item() > 10 * small.item()


def test_imagenet_like_case_meets_the_targets(tmp_path):
    p = synthetic_ensemble_probs(256, 4)
    assert p.shape == (1024, 1000)
    torch.testing.assert_close(p.sum(1), torch.ones(1024))
    assert 0.4 < p.max(1).values.median() < 0.8        # ImageNet-like confidence, not flat, not one-hot
    r = imagenet_like_case(tmp_path, 2048, 4, 5)
    assert r["crops"] == 8192 and r["kl_max"] < 1e-3
    assert r["bytes_per_crop"] <= 29 / 2
    assert sum(r["per_array"].values()) == pytest.approx(r["bytes_per_crop"])


@pytest.mark.slow
def test_bench_label_prints_its_table(tmp_path, in_process):
    data = make_image_dataset(tmp_path / "data", num_classes=3, per_class=4)
    specs = []
    for i, arch in enumerate(["test_resnet", "test_efficientnet"]):
        torch.manual_seed(i)
        torch.save(timm.create_model(arch, num_classes=3).state_dict(), tmp_path / f"{arch}.pth")
        specs.append(f"{arch}={tmp_path / arch}.pth@32")
    result = in_process("bench", "label", data, "-t", ",".join(specs), "--images", 6, "--crops-per-image", 2,
                        "--topk", 2, "--batch-size", 4, "--imagenet-images", 256, "--repeats", 1, "--device", "cpu",
                        "--shard-size", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "| measure | value | reference | target | met |" in out
    for row in ("stage-1 labeller crops/s", "CPU seconds per crop", "bytes/crop, this run's store (3 classes, k=2)",
                "max KL", "ImageNet-like synthetic (1000 classes, k=2, 512 crops)", "durability: fsync of a shard's",
                "the same labeller writing each shard in its loop (no background writer; 3 shard(s) of 2 images"):
        assert row in out, out
    assert "FKD per crop at k=2" in out and "= 17 B" in out
