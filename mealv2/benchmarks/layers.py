"""`mealv2 bench layers`: how close the per-teacher layers of a store (`label --keep-teachers`), recombined
with equal weights, come to the exact ensemble, beside how close the stored ensemble's own top-k comes.

On the demo's data and teachers (mealv2/synthetic.py's generator, the two shipped demo teachers), round-0 crops
are rendered as `mealv2 label` renders them and run through the teachers once; per crop:

- KL(exact ensemble || stored ensemble top-k): the store encoding's error (top-k, leftover spread evenly, codes);
- KL(exact ensemble || recombined layers): each teacher's own top-k encoded alike, rebuilt and averaged
  (what `train --teacher-weights 1,1` trains from).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click
import numpy as np
import torch

from ..cli.params import POSITIVE
from ..common.data.crops import CropParams, sample_crops
from ..common.data.dataset import build_index
from ..common.data.loaders.base import CropRequest
from ..common.data.loaders.registry import available_cores, iterate
from ..common.data.targets import recombination_kl
from ..common.models.runtime import Runtime, machine_description
from ..common.models.teachers import Ensemble, load_teachers
from ..demo import shipped_teachers
from ..synthetic import SyntheticConfig, generate


@click.command()
@click.option("--images-per-class", type=POSITIVE, default=20, show_default=True, help="Generated demo images.")
@click.option("--crops-per-image", "crops", type=POSITIVE, default=4, show_default=True)
@click.option("--res", type=POSITIVE, default=64, show_default=True, help="The demo's labelling res.")
@click.option("--topk", type=POSITIVE, default=5, show_default=True)
def bench_layers(images_per_class, crops, res, topk):
    """KL(exact ensemble || equal-weight recombination of per-teacher top-k layers), beside the stored top-k's."""
    folder = Path(tempfile.mkdtemp(prefix="mealv2-bench-layers-"))
    try:
        data = generate(folder / "data", SyntheticConfig(seed=0, train_per_class=images_per_class, val_per_class=1))
        stored, recombined, classes, top1 = measure(data["train"], crops, res, topk)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    k = min(topk, classes)
    click.echo("\n".join([
        f"`mealv2 bench layers --images-per-class {images_per_class} --crops-per-image {crops} --res {res} --topk "
        f"{topk}` on {machine_description('cpu')}", "",
        f"{len(stored)} crops of the demo's generated data ({classes} classes), the two shipped demo teachers at {res} "
        f"px, equal weights, k = {k}; median top-1 probability of the ensemble {top1:.2f}; KL per crop in nats.", "",
        "| KL(exact ensemble \\|\\| ...) | mean | median | 99th pct | max |", "|---|---|---|---|---|",
        *(f"| {name} | {v.mean():.2e} | {v.median():.2e} | {v.quantile(0.99):.2e} | {v.max():.2e} |"
          for name, v in (("stored ensemble top-k (the store's own encoding)", stored),
                          ("per-teacher top-k layers recombined", recombined)))]))


def measure(data, crops: int, res: int, topk: int) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Per crop of round 0 of ``data``: (KL to the stored ensemble top-k, KL to the recombined layers), the
    classes and the ensemble's median top-1 probability."""
    index = build_index(data)
    teachers, classes, _ = load_teachers(shipped_teachers(), index.classes, res)
    ensemble = Ensemble(teachers, Runtime(torch.device("cpu")))
    ids = np.arange(len(index))
    boxes, flips = sample_crops(0, 0, ids, index.sizes[ids], crops, CropParams(res=res))
    layers = []
    for batch in iterate("torch", index, [CropRequest(ids[i:i + 64], boxes[i:i + 64], flips[i:i + 64])
                                          for i in range(0, len(ids), 64)],
                         ensemble.views, crops, batch_size=64, device="cpu", threads=available_cores()):
        layers.append(ensemble.probs_and_layers(batch.views)[1])
    probs = [torch.cat(p) for p in zip(*layers)]
    stored, recombined = recombination_kl(probs, [t.weight for t in teachers], min(topk, len(classes)))
    top1 = float(sum(probs).div(len(probs)).max(dim=1).values.median())
    return stored, recombined, len(classes), top1
