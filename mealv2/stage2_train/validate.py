"""Top-1/top-5 with MEAL V2's test protocol, shared by `mealv2 train --val` and `mealv2 eval`.

Resize the shorter side to res / 0.875, center crop res, normalise with the model's mean/std
(MEAL V2's and timm's ImageNet evaluation). Images decode as the crop loaders decode them
(EXIF orientation applied, RGB), so a model sees the same pixels in training and evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..common.data.loaders.base import decode_rgb, normalise
from ..common.data.dataset import DatasetIndex
from ..common.models.distributed import DistInfo
from ..common.errors import MealV2Error
from ..common.models.checkpoints import preview_classes
from ..common.models.runtime import Runtime
from ..common.models.teachers import output_index

CROP_PCT = 0.875
# A trainer keeps its val images decoded (uint8, at the val res) from one epoch to the next when
# its share fits in this: 1 GiB holds 7,000 images at 224 px, or 340,000 at 32 px.
CACHE_BYTES = 1 << 30


class _EvalImages(Dataset):
    def __init__(self, index: DatasetIndex, transform):
        self.index, self.transform = index, transform

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return self.transform(decode_rgb(self.index.path(i))), int(self.index.labels[i])


def class_order(model_classes, index: DatasetIndex, where: str) -> torch.Tensor | None:
    """The model's output for each of ``index``'s classes, by name (None: the same order). The
    set may hold fewer classes than the model (a student of ImageNet teachers scored on 10 of
    them); refused when it has no labels or a class the model does not know."""
    if not index.labelled:
        raise MealV2Error(f"{where} has no labels (a folder of loose images or a CSV without a 'label' "
                          f"column); scoring needs a labelled set")
    unknown = [c for c in index.classes if c not in set(model_classes)]
    if unknown:
        raise MealV2Error(f"{where} has class(es) {preview_classes(unknown)} that the model does not know; its "
                          f"{len(model_classes)} classes are {preview_classes(model_classes)}. Score it on data of "
                          f"the model's classes (a misspelt class name or folder?)")
    return output_index(model_classes, index.classes, where, extra_ok=True)


def eval_crop(res: int):
    """PIL image -> the uint8 (3, res, res) tensor that is scored: resize to res / 0.875, center crop."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(int(res / CROP_PCT)), T.CenterCrop(res), T.PILToTensor()])


@dataclass
class DecodedVal:
    """A trainer's val images after the first validation: the decoded uint8 batches of one index at
    one res, kept so that later epochs pay only the forward passes (for the demo's 300 images, JPEG
    decoding was 0.4 s of a 1 s epoch). Left empty when the rank's share exceeds CACHE_BYTES."""

    batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None


@torch.no_grad()
def validate(model: torch.nn.Module, index: DatasetIndex, res: int, mean, std, runtime: Runtime,
             batch_size: int = 64, workers: int = 4, info: DistInfo = DistInfo(),
             order: torch.Tensor | None = None, decoded: DecodedVal | None = None) -> dict:
    """{"top1", "top5" (percent), "num_images"} of ``model`` on ``index``.

    ``order`` (:func:`class_order`) maps the model's outputs onto ``index``'s classes: a set of
    fewer classes is scored among its own classes only, as ImageNet-A/R's 200-class subsets are.

    Under torchrun every rank scores the images ``rank::world_size`` and the counts are summed,
    so the result equals a single process's exactly. Rank 0's buffers are broadcast first: after
    DDP's last training forward each rank's BatchNorm running statistics have moved on its own
    batch, and the checkpoint that keeps this score is rank 0's model. The model is left in eval
    mode; callers that go on training switch it back.

    ``decoded``: a :class:`DecodedVal` the caller passes at every call for one index and res;
    the first call fills it (when the images fit), later calls read it instead of the files.
    """
    if not index.labelled:
        raise MealV2Error(f"{index.root}: images without labels cannot be scored; give a labelled set")
    info.broadcast_buffers(model)
    mine = list(range(info.rank, len(index), info.world_size))
    keep = decoded is not None and decoded.batches is None and len(mine) * 3 * res * res <= CACHE_BYTES
    if decoded is not None and decoded.batches is not None:
        batches = decoded.batches
    else:
        # Worker processes cost more to start than a few batches cost to decode in-process.
        batches = DataLoader(Subset(_EvalImages(index, eval_crop(res)), mine), batch_size=batch_size,
                             num_workers=workers if len(mine) > 4 * batch_size else 0, pin_memory=runtime.cuda)
    model.eval()
    k = min(5, len(index.classes))
    correct1 = correct5 = 0
    kept = []
    for images, labels in batches:
        if keep:
            kept.append((images, labels))
        labels = labels.to(runtime.device, non_blocking=True)
        images = normalise(runtime.input(images), mean, std)
        with runtime.autocast():
            logits = model(images)
        if order is not None:
            logits = logits.index_select(1, order.to(logits.device))
        hits = logits.float().topk(k, dim=1).indices == labels[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
    if keep:
        decoded.batches = kept
    correct1, correct5 = info.all_sum([correct1, correct5])
    n = len(index)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "num_images": n}
