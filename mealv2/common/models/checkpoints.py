"""Models by name: timm models, state dicts in timm and MEAL V2 styles, mealv2 checkpoints.

What a teacher spec means is decided in common/models/teachers.py; this module only builds and
loads models and reads and writes their files.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import hashlib
import pickle
import shutil
from pathlib import Path

import numpy as np

import safetensors
import safetensors.torch
import timm
import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule

from ..errors import MealV2Error
from ..store.faults import fault_point
from ..store.files import write_file

CHECKPOINT_FORMAT = "mealv2-checkpoint"
TRUST_FLAG = "--trust-checkpoint"
# What torch.load(weights_only=True) may build besides tensors and plain containers: data types
# that other training scripts leave in checkpoints (timm's and torchvision's keep their argparse
# Namespace under 'args'; accuracies are often numpy scalars). None of them runs code when built.
# numpy 1 pickled its scalars and arrays under numpy.core, numpy 2 under numpy._core: both names.
SAFE_GLOBALS = [argparse.Namespace, np.dtype, np.ndarray, *{type(np.dtype(t)) for t in "?bBhHiIlLqQefdg"},
                *[(f, f"numpy{core}.multiarray.{f.__name__}") for f in (np._core.multiarray.scalar,
                                                                         np._core.multiarray._reconstruct)
                  for core in (".core", "._core")]]
# Wrapper -> the attribute holding the model it wraps (torch.compile's OptimizedModule keeps it as _orig_mod).
WRAPPERS = {nn.parallel.DistributedDataParallel: "module", nn.DataParallel: "module", OptimizedModule: "_orig_mod"}
_trusted = contextvars.ContextVar("trusted_checkpoints", default=False)


class ModelSpecError(MealV2Error, ValueError):
    """A teacher/student spec or checkpoint that cannot be used; names the spec and the value."""


class ClassCountError(ModelSpecError):
    """A state dict's classifier has ``found`` outputs where the model was built with ``expected``."""

    def __init__(self, message: str, found: int, expected: int):
        super().__init__(message)
        self.found, self.expected = found, expected


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 over the weights themselves, so the same weights hash alike in any file wrapper."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def unwrap_state_dict(obj, where: str) -> dict:
    """Accept timm files, MEAL V2 releases (DataParallel ``module.`` keys) and wrapper dicts."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ModelSpecError(f"{where}: not a state dict (expected tensors, possibly under "
                             f"'state_dict' or 'model')")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: nn.Module, state: dict, where: str) -> None:
    """Strict load with messages that say which keys or shapes disagree."""
    own = model.state_dict()
    head = [k for k in state if k in own and state[k].shape != own[k].shape]
    if head:
        k = head[0]
        message = (f"{where}: '{k}' has shape {tuple(state[k].shape)}, the model expects "
                   f"{tuple(own[k].shape)} (a different class count or architecture?)")
        classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")   # timm names its head
        if isinstance(classifier, str) and k.startswith(classifier + "."):
            raise ClassCountError(message, found=state[k].shape[0], expected=own[k].shape[0])
        raise ModelSpecError(message)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelSpecError(f"{where}: state dict does not fit the architecture; missing keys "
                             f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys "
                             f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")


def create_timm_model(arch: str, num_classes: int, pretrained: bool = False, where: str = "") -> nn.Module:
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('.')[0][:6]}*")[:5]
        raise ModelSpecError(f"{where or arch}: '{arch}' is not a timm model name"
                             + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside its DDP, ``nn.DataParallel`` and ``torch.compile`` wrappers (any nesting): a wrapper
    hides the model's own attributes (timm's ``pretrained_cfg``, ``num_classes``) from whoever reads them."""
    while (inner := next((attr for kind, attr in WRAPPERS.items() if isinstance(model, kind)), None)) is not None:
        model = getattr(model, inner)
    return model


def data_config(model: nn.Module) -> tuple[int, tuple, tuple] | None:
    """(res, mean, std) from the timm data config (``pretrained_cfg``, or an older ``default_cfg``) of the
    model inside any wrappers; None for a model without one, where timm would assume ImageNet's."""
    inner = unwrap_model(model)
    cfg = getattr(inner, "pretrained_cfg", None) or getattr(inner, "default_cfg", None)
    if not isinstance(cfg, dict) or not {"mean", "std"} <= cfg.keys():
        return None
    resolved = timm.data.resolve_data_config({}, pretrained_cfg=cfg)
    return int(resolved["input_size"][-1]), tuple(resolved["mean"]), tuple(resolved["std"])


def default_data_config(model: nn.Module) -> tuple[int, tuple, tuple]:
    """:func:`data_config` of a model that has one (every timm model)."""
    config = data_config(model)
    if config is None:
        raise ModelSpecError(f"{type(unwrap_model(model)).__name__} has no timm data config (pretrained_cfg with "
                             f"mean and std) to take its input size and normalisation from")
    return config


def pretrained_cfg(arch: str):
    """timm's pretrained config of ``arch`` (classes, input size, mean/std), without downloading
    anything; None when timm has none."""
    try:
        return timm.models.get_pretrained_cfg(arch)
    except Exception:   # an unknown name or tag
        return None


@contextlib.contextmanager
def trusting_checkpoints(trusted: bool = True):
    """Within it, checkpoints are unpickled in full (``--trust-checkpoint``): a pickle may run any
    code while it is read, so this is for files the user made or trusts the source of."""
    token = _trusted.set(trusted)
    try:
        yield
    finally:
        _trusted.reset(token)


def load_checkpoint_file(path: str | Path) -> dict:
    """A checkpoint's contents, read as data: tensors, plain containers and SAFE_GLOBALS only,
    so a crafted file cannot run code; anything else is refused unless checkpoints are trusted.
    A safetensors file (timm's hub weights, `mealv2 export`'s) is a state dict, whatever its suffix."""
    if _is_safetensors(path):
        try:
            return safetensors.torch.load_file(str(path))
        except Exception as e:
            raise ModelSpecError(f"{path}: cannot read checkpoint (a safetensors file, damaged: {e})") from None
    trusted = _trusted.get()
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as e:
        if trusted or "global" not in str(e).lower():   # not a pickle of objects: junk or damage
            reason = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            raise ModelSpecError(f"{path}: cannot read checkpoint (not a PyTorch checkpoint, or a damaged "
                                 f"one: {reason})") from None
        raise ModelSpecError(f"{path}: refused to load: besides tensors and plain data it pickles "
                             f"{_unsafe_globals(path)}, which unpickling would import and call (a crafted "
                             f"file runs code that way). If you made this file or trust its source, pass "
                             f"{TRUST_FLAG} to load it in full; otherwise re-save just its weights "
                             f"(torch.save(model.state_dict(), FILE)) where you trust it") from None
    except Exception as e:
        raise ModelSpecError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e


def export_file_metadata(path) -> dict[str, str] | None:
    """The metadata of a `mealv2 export --format safetensors` file (arch, classes, res, mean, std: strings, JSON
    where not plain), which says how to run its weights as its checkpoint did; None for any other file."""
    if not _is_safetensors(path):
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:   # load_checkpoint_file names the damage
        return None
    return meta if meta.get("mealv2_format") == "mealv2-export" else None


def _is_safetensors(path) -> bool:
    """Whether ``path`` starts as a safetensors file does: the length of its JSON header (8 bytes,
    little-endian), then the header's ``{``. A torch zip starts ``PK``, a pickle 0x80."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:   # torch.load names it
        return False
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") > 0


def _unsafe_globals(path) -> str:
    """The globals (classes, functions) a checkpoint needs beyond SAFE_GLOBALS, found without running it."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:   # not a zip checkpoint (legacy format): torch's own message names the first
        return "objects other than tensors"
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    names = [n for n in names if n not in allowed]
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "") if names else "objects other than tensors"


def is_mealv2_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def model_from_mealv2_checkpoint(ckpt: dict, where: str, ema: bool = False) -> nn.Module:
    """The checkpoint's student; ``ema``: the weight average `mealv2 train --model-ema` saves beside it."""
    if ema and ckpt.get("model_ema") is None:
        raise ModelSpecError(f"{where} holds no EMA weights (its run was trained without --model-ema); leave "
                             f"--ema out to use its weights, or train with --model-ema")
    model = create_timm_model(ckpt["arch"], len(ckpt["classes"]), where=where)
    load_weights(model, ckpt["model_ema" if ema else "model"], where)
    return model


def model_from_export(state: dict, meta: dict[str, str], where: str) -> nn.Module:
    """The model of a `mealv2 export --format safetensors` file: its weights ``state`` in the timm model its
    metadata ``meta`` (:func:`export_file_metadata`) names."""
    model = create_timm_model(meta["arch"], int(meta["num_classes"]), where=where)
    load_weights(model, state, where)
    return model


def preview_classes(classes) -> str:
    classes = list(classes)
    return str(classes if len(classes) <= 4 else classes[:3] + ["..."])


def _write_error(path: Path, payload: dict, e: Exception) -> MealV2Error:
    """What to say when a checkpoint could not be written: the file, the space free and needed."""
    needed = sum(t.numel() * t.element_size() for t in _tensors(payload))
    free = shutil.disk_usage(path.parent).free
    then = (f"the previous {path.name} is intact: free some space and continue with --resume" if path.exists()
            else "free some space and run again")
    cause = getattr(e, "strerror", None) or ("no space left on device" if free < needed else e)
    return MealV2Error(f"{path}: cannot write the checkpoint ({cause}); its file system "
                       f"has {free / 2**20:.1f} MiB free, the checkpoint needs about {needed / 2**20:.1f} MiB. The "
                       f"partial file was removed; {then}")


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def save_checkpoint(path: str | Path, *, model: nn.Module, arch: str, classes, res: int, mean, std,
                    **state) -> None:
    """Write a mealv2 checkpoint whole and durably (common/store/files.py): never a half-written file, and
    the temporary files of runs killed while writing it are deleted."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    payload = {"format": CHECKPOINT_FORMAT, "arch": arch, "classes": list(classes), "res": int(res),
               "mean": list(mean), "std": list(std), "model": model.state_dict(), **state}
    path = Path(path)

    def write(f) -> None:
        torch.save(payload, f)
        fault_point("checkpoint_bytes")   # bytes written, not yet synced

    try:
        write_file(path, write, fault="checkpoint_write", sole_writer=True)
    except (OSError, RuntimeError) as e:   # a full disk: OSError, or torch's "unexpected pos" RuntimeError
        raise _write_error(path, payload, e) from e
