"""torch.distributed from torchrun's environment, and every collective mealv2 uses.

A GPU run joins a ``cpu:gloo,cuda:nccl`` process group: tensors go through NCCL when they
live on the GPU and through gloo when they live on the CPU (metrics, counts), and object
collectives work either way. A plain ``nccl`` group refuses CPU tensors, which is how a
first multi-GPU run dies at the end of its first epoch.

All collectives go through the functions here. ``MEALV2_CHECK_COLLECTIVES=cuda`` makes them
check, on any machine, that each tensor they get could travel through the group a CUDA run
would join (its device type has a backend in :func:`backend_for`); tests run the 2-rank CPU
paths with it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .runtime import resolve_device


def backend_for(device_type: str) -> str:
    """The process-group backend of a run on ``device_type`` (device:backend pairs)."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.enabled:
            _check(t)
            dist.all_reduce(t)
        return t.tolist()

    def all_mean(self, values: list[float]) -> list[float]:
        return [v / self.world_size for v in self.all_sum(values)]

    def gather_object(self, obj) -> list:
        """Every rank's ``obj``, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def _check(t: torch.Tensor) -> None:
    simulated = os.environ.get("MEALV2_CHECK_COLLECTIVES")
    if simulated:
        check_backend_has(t, backend_for(simulated))


def check_backend_has(t: torch.Tensor, backend: str) -> None:
    """Refuse ``t`` when a process group of ``backend`` (``gloo``, or ``cpu:gloo,cuda:nccl`` pairs;
    a plain ``nccl`` serves CUDA tensors only) has no backend for the device ``t`` lives on."""
    pairs = dict(pair.split(":") for pair in backend.split(",")) if ":" in backend else None
    serves = set(pairs) if pairs else {"cuda"} if backend == "nccl" else {"cpu", "cuda"}
    if t.device.type not in serves:
        raise RuntimeError(f"collective on a {t.device.type} tensor, but a process group of backend {backend!r} "
                           f"has no backend for {t.device.type} tensors")


@contextmanager
def distributed(device: str = "auto"):
    """Yield (DistInfo, torch.device); joins the process group when torchrun started us."""
    info = DistInfo.from_env()
    dev = resolve_device(device, info.local_rank)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend_for(dev.type))
        try:
            yield info, dev
        finally:
            dist.destroy_process_group()
    else:
        yield info, dev

