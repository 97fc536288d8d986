"""Which crop loader renders the crops: a registry of backends, picked by name or by the device.

Every command that renders stored or sampled crops (label, its teacher check, train, verify
--recompute) goes through :func:`iterate`, so each works without DALI (aarch64 nodes, where
pyproject does not install it, or a machine where it is absent), and each gets its batches from
a producer thread (:mod:`.producer`): the thread that trains never renders. ``auto`` takes, for
the device, the first installed backend of ``AUTO``, and the command says which one runs and why.
Backends are named by module, as cli.py names commands, so the click options that list them
import neither DALI nor torch.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Iterable

from ...errors import MealV2Error


@dataclass(frozen=True)
class Loader:
    render: str                # module:function taking and yielding base.py's requests and batches
    module: str | None         # what must be importable (None: torch and torchvision, always there)
    install: str               # how to get it
    runs: dict[str, str]       # device type: what decodes and renders where


LOADERS = {
    "dali": Loader("mealv2.common.data.loaders.dali:iterate_crops", "nvidia.dali", "pip install nvidia-dali-cuda130 (x86-64 Linux)",
                   {"cpu": "DALI decodes and resizes on the CPU threads",
                    "cuda": "DALI decodes (nvJPEG) and resizes on the GPU"}),
    "torch": Loader("mealv2.common.data.loaders.torch:iterate_crops_torch", None, "",
                    {"cpu": "torchvision/PIL decode and resize to uint8 on the CPU threads",
                     "cuda": "torchvision decodes (nvJPEG) and resizes on the GPU; files read on the CPU threads"}),
    # the torch loader with decoding kept on the CPU on a GPU too: where nvJPEG is missing or slower
    "torch-cpu": Loader("mealv2.common.data.loaders.torch:iterate_crops_torch_cpu", None, "",
                        {"cpu": "torchvision/PIL decode and resize to uint8 on the CPU threads",
                         "cuda": "torchvision/PIL decode and resize on the CPU threads; uint8 to the GPU "
                                 "(pinned), normalised there"}),
}
LOADER_CHOICES = ("auto", *LOADERS)
# --loader auto, per device type: the backends in order of preference, and why the first is preferred.
# On a CPU the torch loader renders 2-4x DALI's crops per core (BENCHMARKS.md, "Loader"); on a GPU
# DALI's pipeline is the design's, torch where DALI is missing.
AUTO = {"cpu": ("torch",), "cuda": ("dali", "torch")}
PREFERRED = {"cpu": "auto takes it on a CPU: more crops per core than DALI", "cuda": "auto takes it on a GPU where installed"}


def installed(name: str) -> bool:
    module = LOADERS[name].module
    if module is None:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):   # a missing parent package; a module blocked in sys.modules
        return False


def resolve(name: str, device_type: str | None = None) -> str:
    """The backend that runs for ``--loader name`` on ``device_type`` (``cpu`` or ``cuda``): ``auto``
    is the first installed of ``AUTO[device_type]`` (and stays ``auto`` without a device type: a
    config checks its flag before the device is known); a named one that is not installed is
    refused with how to install it."""
    if name == "auto":
        return name if device_type is None else next(n for n in AUTO[device_type] if installed(n))
    if name not in LOADERS:
        raise MealV2Error(f"--loader {name}: expected one of {', '.join(LOADER_CHOICES)}")
    if not installed(name):
        raise MealV2Error(f"--loader {name}: {LOADERS[name].module} is not installed; {LOADERS[name].install}, "
                          f"or use --loader auto (takes {AUTO['cpu'][0]} on a CPU and on a GPU "
                          f"{' or '.join(AUTO['cuda'])}, whichever is installed)")
    return name


def describe(name: str, device_type: str, threads: int) -> str:
    """One line saying which loader runs, where it decodes, and why ``auto`` would take it, as
    commands print it (``name`` may be ``auto``)."""
    name, order = resolve(name, device_type), AUTO[device_type]
    why = ""
    if name == order[0]:
        why = f"; {PREFERRED[device_type]}"
    elif name in order and (missing := [n for n in order[:order.index(name)] if not installed(n)]):
        why = f"; {', '.join(missing)} not installed"
    return f"loader: {name} ({LOADERS[name].runs[device_type]}, {threads} threads{why})"


def iterate(name: str, index, requests: Iterable, views: list, crops: int, *, batch_size: int, device: str,
            threads: int, prefetch: int = 2, **options):
    """The :class:`~mealv2.common.data.loaders.base.CropBatch` of each of ``requests``, rendered by backend
    ``name`` (``auto`` or a name: see :func:`resolve`) on a producer thread, ``prefetch`` batches
    ahead; ``options`` are the backend's own (the torch loader's ``decode_on``)."""
    import torch   # here, not above: the click options import this module, and must start fast

    from .producer import produce

    module, function = LOADERS[resolve(name, device.split(":")[0])].render.split(":")
    render = getattr(importlib.import_module(module), function)
    return produce(render(index, requests, views, crops, batch_size=batch_size, device=device, threads=threads,
                          prefetch=prefetch, **options), torch.device(device), prefetch)


def available_cores() -> int:
    """The cores this process may run on (its affinity, as a container or taskset limits it): the
    default number of decoding workers, so a 2-core machine does not start 4 of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1
