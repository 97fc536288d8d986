"""Models by name: timm models, state dicts in timm and MEAL V2 styles, mealv2 checkpoints.

What a teacher spec means is decided in common/teachers.py; this module only builds and
loads models and reads and writes their files.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import timm
import torch
from torch import nn

from .errors import MealV2Error
from .faults import fault_point

CHECKPOINT_FORMAT = "mealv2-checkpoint"


class ModelSpecError(MealV2Error, ValueError):
    """A teacher/student spec or checkpoint that cannot be used; names the spec and the value."""


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
        raise ModelSpecError(f"{where}: '{k}' has shape {tuple(state[k].shape)}, the model expects "
                             f"{tuple(own[k].shape)} (a different class count or architecture?)")
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


def default_data_config(model: nn.Module) -> tuple[int, tuple, tuple]:
    cfg = timm.data.resolve_data_config({}, model=model)
    return int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"])


def pretrained_cfg(arch: str):
    """timm's pretrained config of ``arch`` (classes, input size, mean/std), without downloading
    anything; None when timm has none."""
    try:
        return timm.models.get_pretrained_cfg(arch)
    except Exception:   # an unknown name or tag
        return None


def load_checkpoint_file(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelSpecError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e


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


def preview_classes(classes) -> str:
    classes = list(classes)
    return str(classes if len(classes) <= 4 else classes[:3] + ["..."])


def save_checkpoint(path: str | Path, *, model: nn.Module, arch: str, classes, res: int, mean, std,
                    **state) -> None:
    """Write a mealv2 checkpoint atomically (temp file + rename): never a half-written file."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    payload = {"format": CHECKPOINT_FORMAT, "arch": arch, "classes": list(classes), "res": int(res),
               "mean": list(mean), "std": list(std), "model": model.state_dict(), **state}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    fault_point("checkpoint_write")
    os.replace(tmp, path)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a run killed mid-write
        stale.unlink(missing_ok=True)
