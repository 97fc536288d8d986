"""MEAL V2's loss: soft cross-entropy against the teachers' averaged softmax, plus an optional
discriminator on the final outputs; and the CutMix/mixup that mix crops and their targets.

Mixing is split into pure functions: :func:`draw_mix` draws what to do from a generator,
:func:`mix_images` applies it to any number of views (relative box, so views of any
resolution are cut alike) and :func:`mix_targets` mixes the targets by the same weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """-sum(target * log_softmax(logits / T)) * T^2, batch mean: MEAL V2's "KLLoss" (KL up to the
    target's entropy, a constant), with Hinton's temperature: the target is the teachers'
    softmax(z / T), so the student's logits are divided by T too and the loss is scaled by T^2
    to keep its gradients' size independent of T. Integer targets give plain cross-entropy
    (``--hard-labels``; T must be 1)."""
    if temperature == 1.0:
        return F.cross_entropy(logits.float(), target)
    return F.cross_entropy(logits.float() / temperature, target) * temperature ** 2


def topk_form(probs: torch.Tensor, k: int) -> torch.Tensor:
    """``probs`` reduced to a stored target's form: its own top-k kept, the rest of the mass
    spread evenly over the other classes. Differentiable in the kept and the spread mass."""
    num_classes = probs.shape[1]
    if k >= num_classes:
        return probs
    top, ids = probs.topk(k, dim=1)
    rest = (1 - top.sum(dim=1, keepdim=True)).clamp_min(0) / (num_classes - k)
    return rest.expand(-1, num_classes).scatter(1, ids, top)


class Discriminator(nn.Module):
    """MEAL V2's discriminator on final outputs: 1x1 convs C -> C/8 -> C/64 -> 2.

    Widths are floored at 1 so tiny class counts work. ReLU sits between the convs only:
    the original also applies one to its two output logits, which pins them at >= 0 and
    leaves no gradient once both reach 0.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        c1, c2 = max(num_classes // 8, 1), max(num_classes // 64, 1)
        self.net = nn.Sequential(nn.Conv2d(num_classes, c1, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(c1, c2, 1), nn.ReLU(inplace=True), nn.Conv2d(c2, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, :, None, None]).flatten(1)


def discriminator_loss(disc: Discriminator, logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
                       topk: int | None = None) -> torch.Tensor:
    """BCE-with-logits of ``disc`` telling the student ([1, 0]) from the teachers ([0, 1]).

    Both sides enter as logits: a store keeps probabilities, and their logs are logits up to a
    per-row shift, which is removed by centring each row (as raw log-probabilities, around -7 for
    1000 classes, they leave most of the discriminator's ReLUs dead). The student's is its
    softmax(logits / T), the teachers' the target. With stored targets (``topk``: the store's k) both are first reduced to the same
    form, top-k plus the rest spread evenly (:func:`topk_form`): a stored target's tail is
    exactly flat and a student's is not, so otherwise the discriminator tells them apart from
    the tail alone, its loss falls to 0 and it teaches nothing.
    As in MEAL V2 this is *added* to the distillation loss and the sum is minimised by student
    and discriminator alike (no min-max game); the trainer steps the discriminator with its own
    optimizer on that sum's gradients.
    """
    fake = F.softmax(logits.float() / temperature, dim=1)
    real = target
    if topk is not None:
        fake, real = topk_form(fake, topk), topk_form(target, topk)
    logp = torch.cat([fake, real]).clamp_min(1e-8).log()
    scores = disc(logp - logp.mean(dim=1, keepdim=True))
    labels = torch.zeros_like(scores)
    labels[: len(fake), 0] = 1
    labels[len(fake):, 1] = 1
    return F.binary_cross_entropy_with_logits(scores, labels)


@dataclass(frozen=True)
class Mix:
    """One step's mixing: sample i is mixed with sample i - shift (``torch.roll`` pairing).

    The trainer shifts by the crops per image, so a crop is mixed with a crop of another image.
    """

    lam: float                                         # weight of the sample's own image
    shift: int = 1
    box: tuple[float, float, float, float] | None = None  # CutMix: relative (y0, x0, y1, x1) pasted in


def draw_mix(rng: np.random.Generator, cutmix_alpha: float, cutmix_prob: float, mixup_alpha: float,
             shift: int = 1) -> Mix | None:
    """CutMix with probability ``cutmix_prob`` (if alpha > 0), else mixup (if alpha > 0), else None.

    The CutMix box has area 1 - lam, lam ~ Beta(alpha, alpha), centred uniformly and clipped
    to the image, as in the CutMix paper and MEAL V2's ``--w-cutmix``.
    """
    if cutmix_alpha > 0 and rng.random() < cutmix_prob:
        cut = np.sqrt(1.0 - rng.beta(cutmix_alpha, cutmix_alpha))
        cy, cx = rng.random(2)
        y0, y1 = np.clip([cy - cut / 2, cy + cut / 2], 0, 1)
        x0, x1 = np.clip([cx - cut / 2, cx + cut / 2], 0, 1)
        box = (float(y0), float(x0), float(y1), float(x1))
        return Mix(lam=float(1 - (y1 - y0) * (x1 - x0)), shift=shift, box=box)
    if mixup_alpha > 0:
        return Mix(lam=float(rng.beta(mixup_alpha, mixup_alpha)), shift=shift)
    return None


def _pixel_box(box, res: int) -> tuple[int, int, int, int]:
    return tuple(int(round(v * res)) for v in box)


def mix_images(mix: Mix, images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mixed images (n, 3, res, res) and the weight of each sample's own image in them.

    For CutMix that weight is the pixel area actually kept, which rounding makes differ
    slightly from ``mix.lam``; targets must be mixed with the returned weight.
    """
    other = images.roll(mix.shift, dims=0)
    if mix.box is None:
        return mix.lam * images + (1 - mix.lam) * other, mix.lam
    res = images.shape[-1]
    y0, x0, y1, x1 = _pixel_box(mix.box, res)
    out = images.clone()
    out[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
    return out, 1.0 - (y1 - y0) * (x1 - x0) / res**2


def mix_targets(mix: Mix, lam: float, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """lam * own target + (1 - lam) * the paired sample's; class ids become one-hot first."""
    if not target.is_floating_point():
        target = F.one_hot(target, num_classes).float()
    return lam * target + (1 - lam) * target.roll(mix.shift, dims=0)
