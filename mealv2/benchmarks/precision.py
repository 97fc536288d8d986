"""`mealv2 bench precision`: how far a teacher's reduced-precision forward moves its softmax,
next to how far the store's encoding moves it, on the same crops.

A store keeps each crop's averaged softmax to within the encoding's error (max KL about
1.6e-4 at k=5 on ImageNet-like outputs, BENCHMARKS.md): a teacher forward whose rounding
moves the softmax by more than that makes the encoding's care pointless. Measured per crop:

- KL(fp32 softmax || softmax in bf16 autocast), in fp16 autocast, and with the trunk in bf16
  but the head and softmax in fp32;
- KL(fp32 top-k target || target rebuilt from the store's codes), the encoding's own error.

No pretrained weights can be downloaded here, so the teachers are random-init timm models with a
head that responds to the features' variation over the crops, scaled until the median top-1
probability is ImageNet-like (0.6): trained weights give other activations, so the figures are
indicative, not a promise.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click
import numpy as np
import timm
import torch

from ..cli.params import POSITIVE

from ..common.data.loaders.registry import available_cores
from ..common.data.loaders.base import CropRequest, View
from ..common.data.crops import CropParams, sample_crops
from ..common.data.dataset import build_index
from ..common.data.loaders.registry import iterate
from ..common.data.targets import encode_topk
from ..common.models.runtime import Runtime, machine_description
from ..common.models.teachers import NORMS
from .common import make_photo_dataset
from .label import kl_to_stored

ARCHS = ("resnet50", "efficientnet_b0")
MODES = ("bf16", "fp16", "bf16 trunk, fp32 head")


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    p, q = p.double(), q.double()
    return (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(1)


def calibrate_head(model: torch.nn.Module, x: torch.Tensor, median_top1: float = 0.6) -> None:
    """Give the random-init model a head that responds to how its features vary over ``x`` (a
    random projection of the centred features: a fresh head's logits hardly depend on the input),
    scaled so that the median top-1 probability over ``x`` is ``median_top1``.

    A random-init trunk's features vary little from crop to crop, so the head needs a large gain
    to reach ImageNet-like confidence, and that gain magnifies the trunk's rounding: the KL
    figures are on the pessimistic side of what trained teachers give."""
    head = model.get_classifier()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True).float()
        mu = features.mean(0)
        head.weight.copy_(torch.randn(head.weight.shape, device=features.device) / features.shape[1] ** 0.5)
        head.bias.copy_(-head.weight @ mu)
        z = model(x).float()
        lo, hi = 1e-3, 1e6
        for _ in range(80):   # bisection on the logit scale (log space)
            mid = (lo * hi) ** 0.5
            if torch.softmax(z * mid, 1).max(1).values.median() < median_top1:
                lo = mid
            else:
                hi = mid
        head.weight.mul_(mid)
        head.bias.mul_(mid)


@torch.no_grad()
def precision_case(arch: str, x: torch.Tensor, k: int, device: str = "cpu") -> dict:
    """KL of each reduced-precision forward, and of the encoding, over the crops ``x``, on ``device``
    (autocast of that device type; the fp32 reference runs in true fp32, TF32 off, as
    `--teacher-precision fp32` does)."""
    torch.manual_seed(0)
    x = x.to(device)
    model = timm.create_model(arch, num_classes=1000).eval().to(device)
    fp32 = Runtime(torch.device(device), "fp32")
    with fp32.autocast():
        calibrate_head(model, x)
        p32 = torch.softmax(model(x).float(), 1)
    out = {}
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out["bf16"] = torch.softmax(model(x).float(), 1)
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    with torch.autocast(x.device.type, dtype=torch.float16):
        out["fp16"] = torch.softmax(model(x).float(), 1)
    with fp32.autocast():
        out["bf16 trunk, fp32 head"] = torch.softmax(model.get_classifier()(features.float()).float(), 1)
    # fp16's range (65504) can overflow in a random-init trunk: such crops are counted, not averaged
    overflow = {mode: int((~torch.isfinite(q).all(1)).sum()) for mode, q in out.items()}
    kls = {mode: _kl(p32, q)[torch.isfinite(q).all(1)].cpu() for mode, q in out.items()}
    p32 = p32.cpu()
    ids, codes = encode_topk(p32, k)
    kls["store encoding"] = kl_to_stored(p32, ids, codes)
    return {"top1_median": float(p32.max(1).values.median()),
            "kl": {mode: (float(v.max()), float(v.mean())) if len(v) else (float("nan"),) * 2
                   for mode, v in kls.items()},
            "overflow": overflow}


@click.command("precision")
@click.option("--arch", "archs", multiple=True, default=ARCHS, show_default=True, help="timm architectures.")
@click.option("--res", type=POSITIVE, default=224, show_default=True)
@click.option("--images", type=POSITIVE, default=24, show_default=True, help="Generated ImageNet-sized JPEGs.")
@click.option("--crops-per-image", "crops", type=POSITIVE, default=4, show_default=True)
@click.option("--topk", type=POSITIVE, default=5, show_default=True, help="k of the encoding compared with.")
def bench_precision(archs, res, images, crops, topk):
    """KL of teachers' bf16/fp16 softmax from fp32, beside the store encoding's KL (CPU autocast)."""
    folder = Path(tempfile.mkdtemp(prefix="mealv2-bench-precision-"))
    try:
        data = make_photo_dataset(folder / "data", 10, -(-images // 10))
        index = build_index(data)
        results = measure(index, archs, res, crops, topk)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    lines = [f"`mealv2 bench precision` on {machine_description('cpu')}", "",
             f"{len(index) * crops} crops ({len(index)} generated JPEGs x {crops}) at {res} px, 1000-class random-init "
             f"teachers whose head is a random projection of their centred features, scaled to a median "
             f"top-1 probability of 0.6 (calibrate_head says why this is pessimistic); KL per crop, max (mean).", "",
             *table(results, topk)]
    click.echo("\n".join(lines))


def measure(index, archs, res: int, crops: int, k: int, device: str = "cpu", loader: str = "auto",
            images: int | None = None) -> dict:
    """:func:`precision_case` per architecture over round-0 crops of the first ``images`` images of
    ``index`` (all by default), rendered by the DALI or the torch loader, on ``device``."""
    ids = np.arange(len(index) if images is None else min(images, len(index)))
    boxes, flips = sample_crops(0, 0, ids, index.sizes[ids], crops, CropParams(res=res))
    (batch,) = iterate(loader, index, [CropRequest(ids, boxes, flips)], [View(res, *NORMS["imagenet"])], crops,
                       batch_size=len(ids), device=device, threads=available_cores())
    return {arch: precision_case(arch, batch.views[0], k, device) for arch in archs}


def table(results: dict, k: int) -> list[str]:
    """The markdown table of :func:`measure`'s results (BENCHMARKS.md keeps it)."""
    modes = (*MODES, "store encoding")
    lines = ["| teacher | " + " | ".join(f"KL {m} vs fp32" if m != "store encoding" else f"KL store encoding (k={k})"
                                        for m in modes) + " |",
             "|---|" + "---|" * len(modes)]
    for arch, r in results.items():
        cells = [f"{r['kl'][m][0]:.1e} ({r['kl'][m][1]:.1e})" + (f", {r['overflow'][m]} crops non-finite"
                                                                  if r["overflow"].get(m) else "") for m in modes]
        lines.append(f"| {arch} (median top-1 {r['top1_median']:.2f}) | " + " | ".join(cells) + " |")
    return lines
