"""Soft-label encoding: averaged ensemble softmax -> top-k codes -> training targets.

Per crop the store keeps the top-k class ids and k + 1 codes: the codes of the k
probabilities, then the code of the leftover mass ``1 - sum(top-k)``. A code is
``round(127 * sqrt(p))`` (7 bits in a uint8). The square root is the variance-stabilising
transform for probabilities: a rounding error of at most half a step costs at most about
2 * (0.5 / 127)^2 ~ 3.1e-5 nats of KL per stored value, whatever the probability, where
linear codes would spend most of their error on the small ones. Measured worst case over
1000-class softmax vectors: 1.5e-4 at k=5, 2.7e-4 at k=10 (the bound grows with k + 1);
127 rather than 255 levels saves ~0.75 B per crop at k=5 after compression.

The leftover mass has its own code because it cannot be derived from the quantised top-k:
for a confident crop (p1 = 0.999) the top-1 code alone is uncertain by ~0.008, far more
than the leftover 0.001, and a target rebuilt from ``1 - sum(decoded top-k)`` would put a
wrong (or zero, i.e. infinite-KL) mass on the other classes.
"""
from __future__ import annotations

import math

import torch

from ..store.schema import PROB_LEVELS

# Code 0 covers p in [0, (0.5/127)^2); it decodes to that bin's mean under a uniform sqrt,
# (0.5/127)^2 / 3, never to 0, so no class of a rebuilt target has zero probability.
_ZERO_CODE = 0.5 / math.sqrt(3)
# Teacher weights whose largest is within 2**±20 of 1 are mixed as given (mix_probs).
WEIGHT_EXPONENT = 20


def teacher_probs(logits: list[torch.Tensor], temperature: float) -> list[torch.Tensor]:
    """Each teacher's softmax(logits / T): what its per-teacher layer encodes (``label --keep-teachers``)."""
    return [torch.softmax(z.float() / temperature, dim=1) for z in logits]


def mix_probs(probs: list[torch.Tensor], weights) -> torch.Tensor:
    """Weighted mean of probability rows ``probs`` (one tensor per teacher), in probability space. Weights whose
    largest is far from 1 (1e-45, 1e308: relative weights, any size) are first scaled by a power of two, which is
    exact, so float32 neither flushes them to zero nor overflows their sum; ordinary ones are used as given, so
    the labels stores hold stay bit for bit what their teachers gave."""
    exponent = math.frexp(max(weights))[1]
    if abs(exponent) > WEIGHT_EXPONENT:
        weights = [math.ldexp(w, -exponent) for w in weights]
    return sum(w * p for p, w in zip(probs, weights)) / sum(weights)


def ensemble_probs(logits: list[torch.Tensor], weights: list[float], temperature: float) -> torch.Tensor:
    """Weighted mean of the teachers' softmax(logits / T), averaged in probability space."""
    return mix_probs(teacher_probs(logits, temperature), weights)


def encode_topk(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k class ids (int64, descending probability) and k + 1 uint8 square-root codes:
    the top-k probabilities', then the leftover mass's (``1 - sum(top-k)``)."""
    top, ids = probs.float().topk(k, dim=1)
    rest = (1 - top.sum(dim=1, keepdim=True)).clamp_(min=0)
    values = torch.cat([top, rest], dim=1).clamp_(0, 1)
    codes = torch.round(values.sqrt() * PROB_LEVELS).to(torch.uint8)
    return ids, codes


def decode_probs(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> float32 probabilities (code 0 -> the mean of its bin, see above)."""
    c = codes.float()
    return (torch.where(c == 0, _ZERO_CODE, c) / PROB_LEVELS) ** 2


def reconstruct_targets(ids: torch.Tensor, codes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dense (n, num_classes) targets: the stored top-k, the leftover mass spread evenly over
    the other classes, normalised so rows sum to 1.

    ``codes`` is (n, k + 1) as stored: the top-k codes, then the leftover mass's.
    """
    k = ids.shape[1]
    values = decode_probs(codes)
    top, rest = values[:, :k], values[:, k:]
    if num_classes == k:
        rest = torch.zeros_like(rest)
    target = (rest / max(num_classes - k, 1)).expand(-1, num_classes).clone()
    target.scatter_(1, ids.long(), top)
    return target / target.sum(dim=1, keepdim=True)


def mixed_targets(layers: list[tuple[torch.Tensor, torch.Tensor]], weights, num_classes: int) -> torch.Tensor:
    """Dense targets from per-teacher layers: each layer's (ids, codes) rebuilt as :func:`reconstruct_targets`
    rebuilds the ensemble's, then their mean with ``weights`` (one per layer, nonnegative, not all zero),
    renormalised so rows sum to 1. Layers of weight 0 are not rebuilt."""
    used = [(layer, w) for layer, w in zip(layers, weights) if w]
    mixed = mix_probs([reconstruct_targets(ids, codes, num_classes) for (ids, codes), _ in used], [w for _, w in used])
    return mixed / mixed.sum(dim=1, keepdim=True)


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, in nats (0 log 0 = 0)."""
    p, q = p.double(), q.double()
    return torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.log()), torch.zeros_like(p)).sum(dim=1)


def recombination_kl(probs: list[torch.Tensor], weights, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, how far from the exact ensemble (``mix_probs(probs, weights)``: the teachers' softmax rows)
    its stored forms are: (KL(exact || stored ensemble top-k), KL(exact || the per-teacher top-k layers
    recombined with ``weights``)), each encoded with :func:`encode_topk` as the store does."""
    exact = mix_probs(probs, weights)
    classes = exact.shape[1]
    stored = reconstruct_targets(*encode_topk(exact, k), classes)
    recombined = mixed_targets([encode_topk(p, k) for p in probs], weights, classes)
    return kl_rows(exact, stored), kl_rows(exact, recombined)
