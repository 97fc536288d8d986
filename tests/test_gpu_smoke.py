"""`mealv2 bench gpu`: refuses without CUDA; its steps run end to end (here on the CPU, tiny)."""
from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from mealv2.benchmarks.gpu import report, smoke_run


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_gpu_says_there_is_no_gpu_and_exits_non_zero():
    r = run_cli("bench", "gpu")
    assert r.returncode != 0
    assert "torch sees no CUDA device" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_smoke_run_steps_work_on_the_cpu(tmp_path):
    r = smoke_run(tmp_path, "cpu", per_class=2, res=32, batch=8, epochs=1, compile=False, gpus=1, workers=1,
                  teachers=("test_resnet", "test_efficientnet"), student="test_resnet")
    assert [s["step"] for s in r["steps"]] == ["label", "train", "train online (teachers fp32 at every step)", "eval",
                                            "export onnx"]
    assert r["stored_img_per_s"] > 0 and r["synthetic_img_per_s"] > 0 and r["stage1_ratio"] > 0
    assert 0 <= r["eval_top1"] <= 100
    assert (tmp_path / "run1" / "best.onnx").is_file()
    table = report(r, 12.0)
    assert "| stage-2 stored-label img/s / synthetic-tensor img/s" in table and "| label |" in table
    assert f"{r['stage2_ratio']:.2f} | >= 0.95" in table
