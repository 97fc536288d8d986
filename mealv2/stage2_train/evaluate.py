"""`mealv2 eval`: top-1/top-5 with MEAL V2's test protocol.

Resize the short side to int(res / 0.875), center-crop res x res, normalise with the
model's mean/std (stage2_train.validate does the pass). Three kinds of model:

- a mealv2 checkpoint (``--checkpoint run/best.pt``): arch, classes, res and mean/std come
  from the file; ``-a`` may be left out and must agree when given;
- a plain state dict with ``-a ARCH`` (timm files, MEAL V2's released checkpoints with
  DataParallel ``module.`` keys, possibly under ``'state_dict'``): the teachers' rule for state
  dicts (common/models/teachers.py): ``--res`` must be given, ImageNet mean/std as MEAL V2's test
  script uses (``--norm`` states another, with the names and syntax of a spec's ``%NORM``);
- ``-a ARCH --pretrained``: timm's pretrained weights, with the mean/std of timm's
  pretrained config.

load_model() is shared with `mealv2 export`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import click
import timm

from ..common.models import checkpoints as M
from ..cli.params import POSITIVE, LocalPath, device_option, trust_option, workers_option
from ..common.data.dataset import build_index
from ..common.errors import MealV2Error
from ..common.models.runtime import Runtime
from ..common.models.teachers import NORMS, STATE_DICT_NORM, parse_norm, read_classes_file
from .validate import class_order, validate



class EvalError(MealV2Error, ValueError):
    """A model that cannot be evaluated on DATA (or exported); names both values."""


@dataclass
class LoadedModel:
    model: object                  # torch.nn.Module in eval mode, on the CPU
    arch: str
    num_classes: int
    classes: list[str] | None      # class names, when the file records them
    res: int | None                # resolution the file records (None: a state dict records none)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    kind: str                      # 'mealv2-checkpoint' | 'mealv2-export' | 'state-dict' | 'timm-pretrained'
    ema: bool = False              # the checkpoint's EMA weights (--ema), not its raw ones


def state_dict_num_classes(arch: str, state: dict) -> int | None:
    """Class count of a plain state dict: rows of the classifier timm's config names."""
    cfg = M.pretrained_cfg(arch)
    names = getattr(cfg, "classifier", None) if cfg is not None else None
    for name in (names if isinstance(names, (tuple, list)) else (names,)):
        w = state.get(f"{name}.weight") if name else None
        if w is not None and w.ndim >= 1:
            return int(w.shape[0])
    return None


def load_model(checkpoint: str | None, arch: str | None, pretrained: bool = False,
               num_classes: int | None = None, exportable: bool = False,
               state_dict_classes: list[str] | None = None, ema: bool = False) -> LoadedModel:
    """Build the model a command names. ``num_classes`` (DATA's) is checked, never imposed
    on a checkpoint: a mismatch raises EvalError naming both counts. ``state_dict_classes``
    names a state dict's outputs in order (``--classes``). ``ema``: a mealv2 checkpoint's EMA
    weights (`train --model-ema`)."""
    config = timm.layers.set_layer_config(exportable=True) if exportable else _Null()
    if checkpoint is not None and pretrained:
        raise EvalError("--pretrained loads timm's weights and --checkpoint loads a file: give one of them")
    if ema and checkpoint is None:
        raise _no_ema(f"-a {arch} --pretrained (timm's weights)")
    if checkpoint is None:
        if not arch:
            raise EvalError("name the model: --checkpoint FILE (a mealv2 checkpoint, or a state dict "
                            "with -a ARCH) or -a ARCH --pretrained")
        if not pretrained:
            raise EvalError(f"-a {arch} without --checkpoint or --pretrained would be randomly "
                            f"initialised; add --pretrained (timm's weights) or --checkpoint FILE")
        cfg = M.pretrained_cfg(arch)
        n = int(getattr(cfg, "num_classes", 0) or 1000)
        if num_classes is not None and n != num_classes:
            raise EvalError(f"-a {arch} --pretrained: timm's pretrained weights have {n} classes, "
                            f"DATA has {num_classes} classes")
        with config:
            try:
                model = M.create_timm_model(arch, n, pretrained=True, where=f"-a {arch}")
            except MealV2Error:
                raise
            except Exception as e:
                raise EvalError(f"-a {arch} --pretrained: cannot load timm's pretrained weights "
                                f"({type(e).__name__}: {e}); without network access give a local "
                                f"file with --checkpoint FILE -a {arch}") from e
        res, mean, std = M.default_data_config(model)
        return LoadedModel(model.eval(), arch, n, None, res, mean, std, "timm-pretrained")

    obj = M.load_checkpoint_file(checkpoint)
    if M.is_mealv2_checkpoint(obj):
        _check_recorded(checkpoint, "a mealv2 checkpoint", obj["arch"], obj["classes"], arch, state_dict_classes)
        classes = [str(c) for c in obj["classes"]]   # DATA's classes are matched to them by name
        with config:
            model = M.model_from_mealv2_checkpoint(obj, str(checkpoint), ema=ema)
        return LoadedModel(model.eval(), obj["arch"], len(classes), classes, int(obj["res"]),
                           tuple(obj["mean"]), tuple(obj["std"]), "mealv2-checkpoint", ema)
    if (meta := M.export_file_metadata(checkpoint)) is not None:   # its metadata says how its weights ran
        recorded = json.loads(meta["classes"])   # null: exported from a state dict, whose outputs --classes names
        _check_recorded(checkpoint, "a `mealv2 export`", meta["arch"], recorded, arch, state_dict_classes)
        if ema:
            raise EvalError(f"--ema picks a mealv2 checkpoint's EMA weights; {checkpoint} is a `mealv2 export` of one "
                            f"set of weights (its {meta['weights']} ones): leave --ema out")
        n = int(meta["num_classes"])
        classes = recorded if recorded is not None else _named_outputs(state_dict_classes, n, checkpoint)
        with config:
            model = M.model_from_export(obj, meta, str(checkpoint))
        return LoadedModel(model.eval(), meta["arch"], n, classes, int(meta["res"]), tuple(json.loads(meta["mean"])),
                           tuple(json.loads(meta["std"])), "mealv2-export", meta["weights"] == "ema")

    if ema:
        raise _no_ema(f"{checkpoint} is a plain state dict, which")
    if not arch:
        raise EvalError(f"{checkpoint} is not a mealv2 checkpoint; for a timm or MEAL V2 state dict "
                        f"name its architecture with -a ARCH")
    state = M.unwrap_state_dict(obj, str(checkpoint))
    n = state_dict_num_classes(arch, state) or (len(state_dict_classes) if state_dict_classes else None)
    if n is not None and num_classes is not None and n != num_classes and state_dict_classes is None:
        raise EvalError(f"{checkpoint}: the state dict's classifier has {n} classes, "
                        f"DATA has {num_classes} classes")
    n = n or num_classes or 1000
    with config:
        model = M.create_timm_model(arch, n, where=f"-a {arch}")
    where = f"{checkpoint} (-a {arch}, {n} classes)"
    M.load_weights(model, state, where)
    mean, std = NORMS[STATE_DICT_NORM]
    return LoadedModel(model.eval(), arch, n, _named_outputs(state_dict_classes, n, checkpoint), None, mean, std,
                       "state-dict")


def _named_outputs(classes: list[str] | None, n: int, checkpoint) -> list[str] | None:
    """``--classes``' names of a model's ``n`` outputs, refused unless there is one per output."""
    if classes is not None and len(classes) != n:
        raise EvalError(f"--classes names {len(classes)} classes, {checkpoint} has {n} outputs")
    return classes


def _check_recorded(checkpoint, what: str, recorded_arch: str, recorded_classes, arch: str | None,
                    classes: list[str] | None) -> None:
    """Refuse -a or --classes that disagree with, or would be ignored beside, what ``checkpoint`` records."""
    if arch and arch != recorded_arch:
        raise EvalError(f"{checkpoint} is {what} of {recorded_arch}, but -a says {arch}; leave -a out or make it "
                        f"agree")
    if classes is not None and recorded_classes is not None:
        raise EvalError(f"--classes names a state dict's outputs; {checkpoint} is {what}, which records its own "
                        f"{len(recorded_classes)} classes ({', '.join(map(str, recorded_classes[:3]))}, ...), matched "
                        f"to DATA's by name: leave --classes out")


def _no_ema(what: str) -> EvalError:
    return EvalError(f"--ema picks the EMA weights of a mealv2 checkpoint of `mealv2 train --model-ema`; "
                     f"{what} has none: leave --ema out")


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@click.command()
@click.argument("data", type=LocalPath(exists=True))
@click.option("-a", "--arch", help="timm architecture (optional with a mealv2 checkpoint; must agree).")
@click.option("--checkpoint", type=LocalPath(exists=True, dir_okay=False),
              help="mealv2 checkpoint, or a timm / MEAL V2 state dict (with -a).")
@click.option("--pretrained", is_flag=True, help="timm's pretrained weights for -a ARCH.")
@click.option("--res", type=POSITIVE, default=None,
              help="Test resolution (MEAL V2: 224 or 380). Default: the checkpoint's or timm's pretrained config's; "
                   "required for a state dict.")
@click.option("--classes", "classes_file", type=LocalPath(exists=True, dir_okay=False),
              help="A state dict's class names in output order, one per line (mapped by name onto DATA's).")
@click.option("--norm", help="Normalisation, as a teacher spec's %NORM: imagenet, 0.5, clip, none, timm or "
                             "M:M:M/S:S:S. Default: the checkpoint's, timm's, or imagenet for a state dict.")
@click.option("--ema", is_flag=True, help="Score the checkpoint's EMA weights (`train --model-ema`), not its raw ones.")
@click.option("--batch-size", type=POSITIVE, default=64, show_default=True)
@device_option
@workers_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@trust_option
def evaluate(data, arch, checkpoint, pretrained, res, classes_file, norm, ema, batch_size, device, workers, as_json):
    """Top-1/top-5 of a model on DATA (ImageFolder or CSV) with MEAL V2's test protocol:
    resize to res/0.875, center crop res, the model's mean/std."""
    result = evaluate_model(data, checkpoint, arch=arch, pretrained=pretrained, res=res, classes_file=classes_file,
                            norm=norm, ema=ema, batch_size=batch_size, device=device, workers=workers)
    if as_json:
        click.echo(json.dumps(result))
    else:
        source = checkpoint or f"timm pretrained {result['arch']}"
        source = f"{source}, EMA weights" if result["ema"] else source
        click.echo(f"{result['arch']} ({source}) at {result['res']}px on {result['num_images']} images of {data}")
        click.echo(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%")


def evaluate_model(data, checkpoint=None, *, arch=None, pretrained=False, res=None, classes_file=None, norm=None,
                   ema=False, batch_size=64, device="auto", workers=1) -> dict:
    """What `mealv2 eval` prints as JSON (top1, top5, num_images, arch, res, mean, std, ...)."""
    index = build_index(data, workers=workers)
    if not index.labelled:
        raise EvalError(f"DATA {data} has no labels (a folder of loose images or a CSV without a 'label' column); "
                        f"eval needs a labelled set")
    names = read_classes_file(classes_file) if classes_file else None
    loaded = load_model(checkpoint, arch, pretrained, num_classes=len(index.classes), state_dict_classes=names,
                        ema=ema)
    # Outputs mapped by name onto DATA's classes, as for teachers; DATA may hold fewer (scored among its own).
    # The classes are DATA's to answer for: the checkpoint's are what it was trained on.
    order = class_order(loaded.classes, index, f"DATA {data}") if loaded.classes is not None else None
    res = res or loaded.res
    if res is None:
        raise EvalError(f"{checkpoint} is a state dict, which does not record the resolution it was trained at; "
                        f"pass --res (MEAL V2: 224 or 380)")
    mean, std = (parse_norm(norm, M.default_data_config(loaded.model)[1:], "--norm") if norm
                 else (loaded.mean, loaded.std))
    runtime = Runtime.create(device)
    stats = validate(runtime.model(loaded.model), index, res, mean, std, runtime, batch_size, workers,
                     order=order)
    return {"top1": float(stats["top1"]), "top5": float(stats["top5"]),
            "num_images": int(stats["num_images"]), "arch": loaded.arch, "res": int(res),
            "checkpoint": str(checkpoint) if checkpoint else None, "pretrained": bool(pretrained),
            "model": loaded.kind, "ema": loaded.ema, "num_classes": loaded.num_classes,
            "mean": list(mean), "std": list(std), "data": str(data)}
