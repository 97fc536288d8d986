"""`mealv2 export`: a checkpoint to ONNX, TorchScript or safetensors, checked against PyTorch.

Every export is re-loaded from the written file (onnxruntime, torch.jit.load, a fresh timm
model filled from the safetensors file) and run on a random batch; the largest absolute
difference of its logits from the PyTorch model's is printed, and above
``tolerance * max(1, max |logit|)`` the export fails (exit 2) and nothing is written.
Files are written into a temporary folder next to ``--out`` and moved into place only
after that check, so a failed export never leaves a half-written or unchecked file.

Each file records what a user needs to feed it: arch, class names (JSON; null for a plain
state dict), num_classes, res, mean, std and weights ("ema" with ``--ema``, else "raw"). ONNX
keeps them in ``metadata_props``, TorchScript in the extra file ``mealv2.json``, safetensors in
the header metadata. The
input is ``[batch, 3, res, res]`` float32, already normalised; ONNX's batch axis is dynamic.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import click

from ..cli.params import NON_NEGATIVE, POSITIVE, LocalPath, trust_option
from ..common.errors import MealV2Error
from ..common.store.locks import held_by
from .evaluate import EvalError, LoadedModel, load_model
from .utils import RUN_LOCK

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
TRACE_BATCH = 2    # example batch for tracing / export
CHECK_BATCH = 3    # a different size, so a batch axis baked in at export shows up in the check
EXTRA_FILE = "mealv2.json"


class ExportError(EvalError):
    """The export failed or does not reproduce the PyTorch model's outputs."""


def default_out(checkpoint: str | Path, fmt: str, ema: bool = False) -> Path:
    """run/best.pt -> run/best.onnx, run/best.torchscript.pt, run/best.safetensors; the EMA weights
    to run/best.ema.onnx etc., so that exporting both keeps both."""
    p = Path(checkpoint)
    stem = p.stem if p.suffix in (".pt", ".pth", ".tar", ".bin", ".ckpt") else p.name
    if stem.endswith(".pth"):          # best.pth.tar
        stem = stem[:-4]
    return p.with_name(stem + (".ema" if ema else "") + FORMATS[fmt])


def export_metadata(loaded: LoadedModel, res: int, source: str) -> dict[str, str]:
    """String-valued metadata shared by the three formats."""
    return {"mealv2_format": "mealv2-export", "mealv2_format_version": "1", "arch": loaded.arch,
            "classes": json.dumps(loaded.classes), "num_classes": str(loaded.num_classes),
            "res": str(int(res)), "mean": json.dumps(list(loaded.mean)),
            "std": json.dumps(list(loaded.std)), "source": Path(source).name,
            "weights": "ema" if loaded.ema else "raw"}


# ---------------------------------------------------------------- writers and readers

def _write_onnx(model, example, path: Path, meta: dict, opset: int | None) -> None:
    import torch
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(model, (example,), None, input_names=["input"], output_names=["logits"],
                                dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                                verbose=False)
    program.model.metadata_props.update(meta)
    program.save(str(path))   # weights go to PATH.data only past protobuf's 2 GB limit
    import onnx
    onnx.checker.check_model(str(path), full_check=True)
    written = {entry.domain or "ai.onnx": entry.version for entry in onnx.load(str(path), load_external_data=False)
               .opset_import}.get("ai.onnx")
    if opset is not None and written != opset:   # torch falls back to its own opset when conversion fails
        raise ExportError(f"--opset {opset}: torch.onnx could not convert {meta['arch']} to opset {opset} and wrote "
                          f"opset {written}; nothing written. torch exports opset {written} and later, and converts "
                          f"down only where ONNX's version converter can: leave --opset out, or pass {written} or "
                          f"more")


def _run_onnx(path: Path, x):
    import onnxruntime as ort
    import torch
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(["logits"], {"input": x.numpy()})
    return torch.from_numpy(out)


def _write_torchscript(model, example, path: Path, meta: dict, opset: int | None) -> None:
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch.jit is deprecated but still works
        with torch.no_grad():
            traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(meta)})


def _run_torchscript(path: Path, x):
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(x)


def _write_safetensors(model, example, path: Path, meta: dict, opset: int | None) -> None:
    from safetensors.torch import save_file
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage().data_ptr()
        if storage in seen:         # tied weights: safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    save_file(tensors, str(path), metadata={"format": "pt", **meta})


def load_safetensors_model(path: str | Path):
    """A fresh timm model with the weights of a `mealv2 export --format safetensors` file,
    and the file's metadata (arch, classes, res, mean, std as JSON strings)."""
    from ..common.models.checkpoints import export_file_metadata, load_checkpoint_file, model_from_export
    meta = export_file_metadata(path)
    if meta is None:
        raise ExportError(f"{path}: no mealv2 export metadata in the safetensors file; not written by mealv2 export")
    return model_from_export(load_checkpoint_file(path), meta, str(path)).eval(), meta


def _run_safetensors(path: Path, x):
    import torch
    model, _ = load_safetensors_model(path)
    with torch.no_grad():
        return model(x)


WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "safetensors": _write_safetensors}
RUNNERS = {"onnx": _run_onnx, "torchscript": _run_torchscript, "safetensors": _run_safetensors}


def export_model(loaded: LoadedModel, fmt: str, out: Path, res: int, source: str,
                 opset: int | None = None, tolerance: float = 1e-3, seed: int = 0) -> float:
    """Write ``out``, re-load it, compare with PyTorch; returns the max abs logit difference."""
    import torch
    model = loaded.model.eval()
    g = torch.Generator().manual_seed(seed)
    example = torch.randn(TRACE_BATCH, 3, res, res, generator=g)
    check = torch.randn(CHECK_BATCH, 3, res, res, generator=g)
    try:
        with torch.no_grad():
            reference = model(check).float()
    except Exception as e:
        raise ExportError(f"{loaded.arch} does not run at {res}x{res} ({type(e).__name__}: {e}); "
                          f"pass the resolution it was made for with --res") from e

    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp = tmpdir / out.name
        meta = export_metadata(loaded, res, source)
        try:
            WRITERS[fmt](model, example, tmp, meta, opset)
            got = RUNNERS[fmt](tmp, check).float()
        except MealV2Error:
            raise
        except Exception as e:
            raise ExportError(f"exporting {loaded.arch} to {fmt} failed: {type(e).__name__}: {e}") from e
        if got.shape != reference.shape:
            raise ExportError(f"the {fmt} model returns shape {tuple(got.shape)} for a batch of "
                              f"{CHECK_BATCH}, PyTorch {tuple(reference.shape)}; nothing written")
        diff = float((got - reference).abs().max())
        limit = tolerance * max(1.0, float(reference.abs().max()))
        if not diff <= limit:   # also catches NaN
            raise ExportError(f"the {fmt} model's logits differ from PyTorch's by up to {diff:.3g} "
                              f"(limit {limit:.3g}) on a random batch of {CHECK_BATCH}; {out} not written")
        umask = os.umask(0)
        os.umask(umask)
        for f in sorted(tmpdir.iterdir()):
            os.chmod(f, 0o666 & ~umask)   # some writers create 0600 files; make it a normal file
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return diff


@click.command()
@click.argument("checkpoint", type=LocalPath(exists=True, dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), required=True, help="Output format.")
@click.option("--out", "-o", type=LocalPath(dir_okay=False),
              help="Output file. Default: CHECKPOINT with the suffix .onnx, .torchscript.pt or .safetensors "
                   "(.ema.onnx etc. with --ema).")
@click.option("-a", "--arch", help="timm architecture of a plain state dict (optional for a mealv2 checkpoint).")
@click.option("--res", type=POSITIVE, default=None,
              help="Input resolution of the export and the check. Default: the checkpoint's (required for a state dict).")
@click.option("--ema", is_flag=True,
              help="Export the checkpoint's EMA weights (`train --model-ema`), not its raw ones.")
@click.option("--opset", type=click.IntRange(min=7), default=None,
              help="ONNX opset (default: torch's). Below torch's own it is converted down, and refused where "
                   "that fails.")
@click.option("--tolerance", type=NON_NEGATIVE, default=1e-3, show_default=True,
              help="Largest allowed |exported - PyTorch| logit difference, relative to max(1, max |logit|).")
@trust_option
def export(checkpoint, fmt, out, arch, res, ema, opset, tolerance):
    """Export CHECKPOINT (a mealv2 checkpoint, or a timm / MEAL V2 state dict with -a ARCH) and
    check the exported model's logits against PyTorch's on a random batch."""
    loaded = load_model(checkpoint, arch, exportable=fmt != "safetensors", ema=ema)
    res = res or loaded.res
    if res is None:
        raise ExportError(f"{checkpoint} is a state dict, which does not record its resolution; pass --res")
    out = Path(out) if out else default_out(checkpoint, fmt, ema)
    if out.exists() and out.resolve() == Path(checkpoint).resolve():
        raise ExportError(f"--out {out} is the checkpoint itself; choose another path")
    diff = export_model(loaded, fmt, out, res, checkpoint, opset=opset, tolerance=tolerance)
    weights = ", EMA weights" if ema else ""
    click.echo(f"wrote {out} ({fmt}: {loaded.arch}{weights}, {loaded.num_classes} classes, input "
               f"[batch, 3, {res}, {res}] normalised with mean {list(loaded.mean)} std {list(loaded.std)})")
    click.echo(f"max abs difference of logits vs PyTorch on a random batch of {CHECK_BATCH}: {diff:.3g} "
               f"(tolerance {tolerance:g} x max(1, max |logit|))")
    if holder := held_by(Path(checkpoint).resolve().parent / RUN_LOCK):
        click.echo(f"note: {Path(checkpoint).parent} is still training ({holder}): this is {checkpoint} as saved "
                   f"so far; export it again once the run has ended", err=True)
