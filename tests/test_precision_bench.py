"""`mealv2 bench precision`'s measures: the calibrated head and the KL of each reduced precision."""
from __future__ import annotations

import pytest
import timm
import torch

from mealv2.benchmarks.precision import MODES, calibrate_head, precision_case


def test_calibrated_head_gives_imagenet_like_confidence_that_depends_on_the_input():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=1000).eval()
    x = torch.randn(32, 3, 64, 64)
    calibrate_head(model, x, median_top1=0.6)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    assert p.max(1).values.median() == pytest.approx(0.6, abs=0.02)
    assert p.argmax(1).unique().numel() > 4          # the crops do not all get the same answer


def test_precision_case_measures_rounding_against_the_fp32_softmax():
    torch.manual_seed(0)
    r = precision_case("test_resnet", torch.randn(16, 3, 64, 64), k=5)
    for mode in (*MODES, "store encoding"):
        worst, mean = r["kl"][mode]
        assert 0 <= mean <= worst
    assert r["kl"]["bf16"][0] > 0                     # bf16 rounding moves the softmax
    assert r["kl"]["fp16"][0] < r["kl"]["bf16"][0]     # 10-bit mantissa against 7: fp16 moves it less
