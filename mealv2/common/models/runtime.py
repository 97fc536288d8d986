"""Where models run: the one place that decides the device, the precision and the memory format.

Students train and validate in bf16 autocast with channels_last on a GPU, in fp32 on a CPU.
Teachers run in the precision a command asks for (``--teacher-precision``): fp32 by default,
because bf16 rounding moves a teacher's softmax by more than the store's encoding does
(BENCHMARKS.md, "Teacher precision"); on a GPU fp32 means true fp32 (TF32 off) unless ``tf32``
is asked for.
"""
from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass

import torch

from ..errors import MealV2Error

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")   # forward precisions, applied by Runtime

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; under torchrun each rank takes its local GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise MealV2Error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); "
                              "use --device cpu, or --device auto to take a GPU when there is one")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise MealV2Error(f"--device {device}: expected auto, cpu or cuda")
    return torch.device("cpu")


@contextlib.contextmanager
def _tf32(allowed: bool):
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled,
                                        benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=allowed):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


@dataclass(frozen=True)
class Runtime:
    """A device and a precision: how models and their inputs are placed and run."""

    device: torch.device
    precision: str = "auto"     # auto: bf16 on a GPU, fp32 on a CPU

    def __post_init__(self):
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise MealV2Error(f"precision {self.precision}: expected one of {', '.join(PRECISIONS)}")
        if self.precision == "tf32" and self.device.type != "cuda":
            raise MealV2Error("--teacher-precision tf32 needs a CUDA device (TF32 is a GPU format)")

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto", local_rank: int = 0) -> "Runtime":
        return cls(resolve_device(device, local_rank), precision)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def resolved_precision(self) -> str:
        if self.precision == "auto":
            return "bf16" if self.cuda else "fp32"
        return self.precision

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.cuda else torch.contiguous_format

    def autocast(self):
        """The context a forward pass runs in."""
        precision = self.resolved_precision
        if precision in _AUTOCAST:
            return torch.autocast(self.device.type, dtype=_AUTOCAST[precision])
        if self.cuda:
            return _tf32(precision == "tf32")
        return contextlib.nullcontext()

    def model(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device, memory_format=self.memory_format)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def machine_description(device: str) -> str:
    """The machine a figure was measured on (benchmarks, the demo's report)."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    cpu = (f"{os.cpu_count()}-core {platform.machine()} CPU (load average {load} at the end), "
           f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} + {cpu}"
    return cpu + (", no GPU" if not torch.cuda.is_available() else "")
