"""torch.distributed from torchrun's environment, and every collective mealv2 uses.

A GPU run joins a ``cpu:gloo,cuda:nccl`` process group: tensors go through NCCL when they
live on the GPU and through gloo when they live on the CPU (metrics, counts), and object
collectives work either way. A plain ``nccl`` group refuses CPU tensors, which is how a
first multi-GPU run dies at the end of its first epoch.

All collectives go through the functions here. ``MEALV2_CHECK_COLLECTIVES=GROUP`` makes each
of them check, on any machine, that it could travel through GROUP: a tensor collective on its
tensor's device, object collectives and barriers on the device torch picks for them in that
group (CPU where the group has a CPU backend, as ``_get_object_coll_device`` does). GROUP is
``cuda`` (the group a CUDA run joins, :func:`backend_for`), or a backend string such as ``nccl``
(a plain NCCL group, which refuses CPU tensors: the check fails as a first multi-GPU run would).
Tests run the 2-rank CPU paths with ``cuda``.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .runtime import resolve_device


def local_rank(rank: int, env, cuda_devices: int) -> int:
    """The GPU of group rank ``rank``: torchrun's ``LOCAL_RANK`` in ``env``; without it (a group that
    ``mp.spawn`` or a script started) the rank modulo the ``cuda_devices`` visible, so the ranks on a
    machine spread over its GPUs rather than all landing on cuda:0 (ranks numbered machine by machine)."""
    if "LOCAL_RANK" in env:
        return int(env["LOCAL_RANK"])
    return rank % cuda_devices if cuda_devices else 0


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

    @classmethod
    def current(cls) -> "DistInfo":
        """This process's place in the torch.distributed group it has joined (one rank of one when none):
        a user's own loop initialises the group itself, under torchrun or ``mp.spawn``."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        rank = dist.get_rank()
        return cls(rank, dist.get_world_size(), local_rank(rank, os.environ, torch.cuda.device_count()))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            _check_objects("barrier")
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

    def average_gradients(self, module: torch.nn.Module) -> None:
        """Each parameter's gradient averaged over the ranks, in place: what DDP does in backward, for
        a module a user's loop does not wrap in DDP."""
        if not self.enabled:
            return
        for p in module.parameters():
            if p.grad is not None:
                _check(p.grad)
                dist.all_reduce(p.grad)
                p.grad /= self.world_size

    def broadcast_buffers(self, module: torch.nn.Module, src: int = 0) -> None:
        """Rank ``src``'s buffers (BatchNorm running statistics) on every rank, in place."""
        if not self.enabled:
            return
        for t in module.buffers():
            _check(t)
            dist.broadcast(t, src=src)

    def gather_object(self, obj) -> list:
        """Every rank's ``obj``, on every rank."""
        if not self.enabled:
            return [obj]
        _check_objects("all_gather_object")
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.enabled:
            return obj
        _check_objects("broadcast_object_list")
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def simulated_group() -> str | None:
    """The process group ``MEALV2_CHECK_COLLECTIVES`` stands for (module docstring), or None."""
    value = os.environ.get("MEALV2_CHECK_COLLECTIVES")
    return backend_for(value) if value in ("cuda", "cpu") else value or None


def _check(t: torch.Tensor) -> None:
    group = simulated_group()
    if group:
        check_backend_has(t, group)


def _check_objects(what: str) -> None:
    """Object collectives and barriers pickle into (or reduce) a tensor on the group's object device."""
    group = simulated_group()
    if group:
        check_device_served(object_device(group), group, what)


def object_device(backend: str) -> str:
    """The device torch uses for object collectives and barriers in a group of ``backend``: CPU
    where the group has a CPU backend, else its first device (torch's _get_object_coll_device)."""
    pairs = [pair.split(":")[0] for pair in backend.split(",")] if ":" in backend else None
    if pairs is None:
        return "cuda" if backend == "nccl" else "cpu"
    return "cpu" if "cpu" in pairs else pairs[0]


def check_backend_has(t: torch.Tensor, backend: str) -> None:
    """Refuse ``t`` when a process group of ``backend`` (``gloo``, or ``cpu:gloo,cuda:nccl`` pairs;
    a plain ``nccl`` serves CUDA tensors only) has no backend for the device ``t`` lives on."""
    check_device_served(t.device.type, backend, f"collective on a {t.device.type} tensor")


def check_device_served(device_type: str, backend: str, what: str) -> None:
    """Refuse ``what`` (a collective on ``device_type``) when a group of ``backend`` cannot serve it."""
    pairs = dict(pair.split(":") for pair in backend.split(",")) if ":" in backend else None
    serves = set(pairs) if pairs else {"cuda"} if backend == "nccl" else {"cpu", "cuda"}
    if device_type not in serves:
        raise RuntimeError(f"{what}, but a process group of backend {backend!r} has no backend for "
                           f"{device_type} tensors")


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

