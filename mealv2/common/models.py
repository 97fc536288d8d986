"""Models by name: teacher specs, timm students, and mealv2 checkpoints.

A teacher spec is ``ARCH`` (timm pretrained weights), ``ARCH=CHECKPOINT`` (timm
architecture, local state dict in timm or MEAL V2 style) or ``CHECKPOINT`` (written by
``mealv2 train``), each optionally followed by ``@RES`` (its own input resolution) and
``*W`` (its ensemble weight), e.g. ``tf_efficientnet_b4_ns@380*2``.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from .errors import MealV2Error
from .faults import fault_point

CHECKPOINT_FORMAT = "mealv2-checkpoint"
_SPEC = re.compile(r"^(?P<body>.+?)(?:@(?P<res>\d+))?(?:\*(?P<weight>[0-9]*\.?[0-9]+))?$")


class ModelSpecError(MealV2Error, ValueError):
    """A teacher/student spec or checkpoint that cannot be used; names the spec and the value."""


@dataclass
class Teacher:
    spec: str
    arch: str
    model: nn.Module
    res: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weight: float
    sha256: str

    def to_attrs(self) -> dict:
        return {"spec": self.spec, "arch": self.arch, "sha256": self.sha256, "res": self.res,
                "mean": list(self.mean), "std": list(self.std), "weight": self.weight}


def split_specs(specs: tuple[str, ...] | list[str]) -> list[str]:
    """``--teachers`` is repeatable and comma separated."""
    return [s.strip() for group in specs for s in group.split(",") if s.strip()]


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


def load_checkpoint_file(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelSpecError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e


def is_mealv2_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def model_from_mealv2_checkpoint(ckpt: dict, where: str) -> nn.Module:
    model = create_timm_model(ckpt["arch"], len(ckpt["classes"]), where=where)
    load_weights(model, ckpt["model"], where)
    return model


def load_teacher(spec: str, classes: tuple[str, ...] | list[str]) -> Teacher:
    """Build one teacher for a dataset with ``classes``; refuses class-count or name mismatches."""
    m = _SPEC.match(spec)
    if not m:
        raise ModelSpecError(f"teacher spec '{spec}': expected ARCH, ARCH=CHECKPOINT or CHECKPOINT, "
                             f"optionally with @RES and *WEIGHT")
    body, weight = m["body"], float(m["weight"] or 1.0)
    if weight <= 0:
        raise ModelSpecError(f"teacher spec '{spec}': weight must be positive, got {weight}")
    num_classes = len(classes)
    if "=" in body:
        arch, ckpt_path = body.split("=", 1)
        if not Path(ckpt_path).is_file():
            raise ModelSpecError(f"teacher spec '{spec}': checkpoint file {ckpt_path} does not exist")
        state = unwrap_state_dict(load_checkpoint_file(ckpt_path), ckpt_path)
        model = create_timm_model(arch, num_classes, where=f"teacher spec '{spec}'")
        load_weights(model, state, f"teacher '{spec}' ({ckpt_path}, dataset has {num_classes} classes)")
        res, mean, std = default_data_config(model)
    elif Path(body).is_file():
        ckpt = load_checkpoint_file(body)
        if not is_mealv2_checkpoint(ckpt):
            raise ModelSpecError(f"teacher spec '{spec}': {body} is not a mealv2 checkpoint; for a "
                                 f"timm or MEAL V2 state dict write ARCH={body}")
        if list(ckpt["classes"]) != list(classes):
            raise ModelSpecError(f"teacher '{spec}': trained on {len(ckpt['classes'])} classes "
                                 f"{preview_classes(ckpt['classes'])}, dataset has {num_classes} classes "
                                 f"{preview_classes(classes)}")
        arch = ckpt["arch"]
        model = model_from_mealv2_checkpoint(ckpt, f"teacher '{spec}'")
        res, mean, std = int(ckpt["res"]), tuple(ckpt["mean"]), tuple(ckpt["std"])
    else:
        arch = body
        if os.sep in body or body.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise ModelSpecError(f"teacher spec '{spec}': file {body} does not exist")
        model = create_timm_model(arch, num_classes, pretrained=True, where=f"teacher spec '{spec}'")
        res, mean, std = default_data_config(model)
    res = int(m["res"]) if m["res"] else res
    return Teacher(spec=spec, arch=arch, model=model.eval(), res=res, mean=mean, std=std,
                   weight=weight, sha256=state_dict_sha256(model))


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
