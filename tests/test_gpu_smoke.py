"""`mealv2 bench gpu`: refuses without CUDA; its steps run end to end (here on the CPU, tiny)."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from mealv2.benchmarks import gpu
from mealv2.benchmarks.gpu import loader_backends, report, smoke_run


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_gpu_says_there_is_no_gpu_and_exits_non_zero(in_process):
    r = in_process("bench", "gpu")
    assert r.returncode != 0
    assert "torch sees no CUDA device" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_smoke_run_steps_work_on_the_cpu(tmp_path, monkeypatch, in_process):
    """Every measure of the GPU run, tiny, on the CPU: the script a GPU session runs is known to work.
    A backend that fails (here one that no loader has) is recorded in the table and the run goes on.
    Its `mealv2` commands run in this process (an interpreter start each would be most of the time)."""
    backends = [*loader_backends(), "no-such-backend"]
    monkeypatch.setattr(gpu, "loader_backends", lambda: backends)

    def run_here(command, **kwargs):
        assert command[:3] == [sys.executable, "-m", "mealv2.cli"] and all(isinstance(a, str) for a in command)
        r = in_process(*command[3:])
        return subprocess.CompletedProcess(command, r.returncode, r.stdout, r.stderr)

    monkeypatch.setattr(gpu, "subprocess", SimpleNamespace(run=run_here))
    r = smoke_run(tmp_path, "cpu", images=12, rows=24, files=4, res=32, batch=8, epochs=1, compile=False, gpus=1,
                  workers=1, stage1_teachers=("test_resnet",), online_teachers=("test_resnet", "test_efficientnet"),
                  student="test_resnet", shard_size=4)
    steps = {s["step"]: s for s in r["steps"]}
    assert r["failed"] == ["train --loader no-such-backend"], [steps[f] for f in r["failed"]]
    assert "'no-such-backend' is not a choice" in steps["train --loader no-such-backend"]["error"]
    assert set(r["stored_img_per_s"]) == set(loader_backends()) and r["synthetic_img_per_s"] > 0
    s1 = r["stage1"]
    assert s1["ratio"] > 0 and s1["inline_ratio"] > 0 and s1["shards"] == 3     # 12 images in shards of 4
    assert r["online_img_per_s"] > 0 and r["ideal"] > 1 and r["stored_over_online"] > 0
    assert 0 <= r["eval_top1"] <= 100
    assert (tmp_path / f"run-{r['best_loader']}" / "best.onnx").is_file()
    table = report(r, 12.0)
    for backend in loader_backends():
        ratio = r["stage2_ratio"][backend]
        assert (f"| stage-2 stored-label img/s / synthetic-tensor img/s, `--loader {backend}` "
                f"({r['stored_img_per_s'][backend]:.0f} / {r['synthetic_img_per_s']:.0f}) | {ratio:.2f} | >= 0.95"
                ) in table
    assert "| stage-1 labeller / bare teacher forward (test_resnet bf16; " in table
    assert f"| {s1['ratio']:.2f} | >= 0.9 |" in table
    assert "| stored / online img/s, teachers test_resnet + test_efficientnet bf16" in table
    assert "of it | >= 0.9 of the ideal |" in table
    assert "`--loader no-such-backend` | not measured: failed" in table
    assert "| train --loader no-such-backend |" in table
    json.dumps(r)   # what bench gpu writes
