"""Soft-label encoding: averaged ensemble softmax -> top-k codes -> training targets.

Probabilities are stored as uint8 codes of their square root. The square root is the
variance-stabilising transform for probabilities: a rounding error of at most half a
step costs at most 2 * (0.5 / 255)^2 ~ 7.7e-6 nats of KL per stored entry, whatever the
probability, where linear uint8 codes would spend most of their error on the small
tail probabilities.
"""
from __future__ import annotations

import torch

PROB_LEVELS = 255


def ensemble_probs(logits: list[torch.Tensor], weights: list[float], temperature: float) -> torch.Tensor:
    """Weighted mean of the teachers' softmax(logits / T), averaged in probability space."""
    total = sum(weights)
    probs = sum(w * torch.softmax(z.float() / temperature, dim=1) for z, w in zip(logits, weights))
    return probs / total


def encode_topk(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k class ids (int64, descending probability) and their uint8 square-root codes."""
    top, ids = probs.topk(k, dim=1)
    codes = torch.round(top.clamp_(0, 1).sqrt() * PROB_LEVELS).to(torch.uint8)
    return ids, codes


def decode_probs(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> float32 probabilities."""
    return (codes.float() / PROB_LEVELS) ** 2


def reconstruct_targets(ids: torch.Tensor, codes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dense (n, num_classes) targets: stored top-k, the leftover mass spread evenly over the rest.

    Rows sum to 1. If quantisation pushes the top-k mass above 1 it is renormalised and
    the rest get nothing, as FKD does for its fp16 values.
    """
    top = decode_probs(codes)
    mass = top.sum(dim=1, keepdim=True)
    top = torch.where(mass > 1, top / mass, top)
    k = ids.shape[1]
    rest = (1 - top.sum(dim=1, keepdim=True)).clamp_(min=0) / max(num_classes - k, 1)
    target = rest.expand(-1, num_classes).clone()
    target.scatter_(1, ids.long(), top)
    return target / target.sum(dim=1, keepdim=True)
