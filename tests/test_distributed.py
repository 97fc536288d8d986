"""Collectives: what a CUDA run's process group serves, and that every collective goes through it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import mealv2
from mealv2.common.models.distributed import backend_for, check_backend_has

PACKAGE = Path(mealv2.__file__).parent


def test_a_cuda_run_joins_a_group_that_serves_cpu_and_cuda_tensors():
    assert backend_for("cuda") == "cpu:gloo,cuda:nccl" and backend_for("cpu") == "gloo"
    for backend in (backend_for("cuda"), backend_for("cpu")):
        check_backend_has(torch.zeros(2, dtype=torch.float64), backend)   # metrics and counts live on the CPU


def test_the_checker_refuses_a_cpu_tensor_in_a_plain_nccl_group():
    """What killed a first multi-GPU run at the end of epoch 0: an all_reduce of a CPU tensor under nccl."""
    with pytest.raises(RuntimeError, match="cpu tensor.*'nccl'"):
        check_backend_has(torch.zeros(2), "nccl")
    with pytest.raises(RuntimeError, match="meta tensor"):
        check_backend_has(torch.zeros(2, device="meta"), backend_for("cuda"))


def test_every_collective_goes_through_common_models_distributed():
    """The checker (MEALV2_CHECK_COLLECTIVES, used by the 2-rank tests) sees a collective only if it goes
    through DistInfo; a direct torch.distributed call elsewhere would escape it."""
    allowed = PACKAGE / "common" / "models" / "distributed.py"
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def test_the_simulated_group_sees_every_collective_and_a_plain_nccl_one_refuses_cpu_tensors(monkeypatch):
    """MEALV2_CHECK_COLLECTIVES checks tensor sums, object collectives and barriers; a simulated plain
    NCCL group (no CPU backend) refuses the CPU metrics sum that a CUDA run's cpu:gloo,cuda:nccl serves."""
    import mealv2.common.models.distributed as d

    for name in ("all_reduce", "barrier", "all_gather_object", "broadcast_object_list"):
        monkeypatch.setattr(d.dist, name, lambda *a, **k: None)
    seen = []
    real = d.check_device_served
    monkeypatch.setattr(d, "check_device_served", lambda device, group, what: (seen.append((what, device, group)),
                                                                              real(device, group, what)))
    info = d.DistInfo(rank=0, world_size=2)
    monkeypatch.setenv("MEALV2_CHECK_COLLECTIVES", "cuda")
    info.all_sum([1.0])
    info.gather_object(1)
    info.broadcast_object(1)
    info.barrier()
    assert [(what.split(" ")[0], device) for what, device, _ in seen] == [
        ("collective", "cpu"), ("all_gather_object", "cpu"), ("broadcast_object_list", "cpu"), ("barrier", "cpu")]
    assert {group for _, _, group in seen} == {"cpu:gloo,cuda:nccl"}
    monkeypatch.setenv("MEALV2_CHECK_COLLECTIVES", "nccl")
    with pytest.raises(RuntimeError, match=r"collective on a cpu tensor, but a process group of backend 'nccl'"):
        info.all_sum([1.0])
    assert d.object_device("nccl") == "cuda" and d.object_device("cuda:nccl,cpu:gloo") == "cpu"
