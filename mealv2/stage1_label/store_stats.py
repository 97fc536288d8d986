"""What a store's soft labels say, as numbers: pure functions of a round's stored ids and codes, summed
round by round (a store's rounds need not fit in memory together). `inspect --report` draws them
(store_report.py); nothing here draws or reads files.

Per crop: its stored top-1 probability; the entropy of the target a student trains on (the top-k,
the leftover spread evenly over the other classes, normalised: common/data/targets.py); the mass the
stored top-k keeps, 1 - the leftover (the k + 1-th code); the runner-up's probability. Per
class (the image's label, or for a store without labels the crop's top-1 class): crops, mean top-1
probability, mean entropy and, with labels, how often the top-1 is the label.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ..common.data.targets import decode_probs

BINS = 40        # histogram bins of the top-1 probability, the kept mass and the entropy
PICKS = 24       # crops kept per contact sheet candidate list (a sheet draws fewer; the rest replace repeats)


def pick_dtype(k: int) -> np.dtype:
    """One crop picked for a contact sheet: its score (lowest first), where it is, and its stored top-k."""
    return np.dtype([("score", "f8"), ("round", "i4"), ("image", "i8"), ("crop", "i4"), ("box", "u2", (4,)),
                     ("flip", "u1"), ("ids", "i8", (k,)), ("probs", "f4", (k,))])


def crop_measures(ids: np.ndarray, codes: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Per crop (any leading shape, flattened): ``probs`` (n, k) the stored top-k probabilities, ``p1`` the
    top-1's, ``p2`` the runner-up's (0 when k = 1), ``kept`` 1 - the leftover mass, ``cum`` (n, k)
    the mass of the top-j stored classes, ``entropy`` of the rebuilt training target in nats, ``top1`` the
    top-1 class."""
    k = ids.shape[-1]
    values = decode_probs(torch.from_numpy(np.ascontiguousarray(codes.reshape(-1, k + 1)))).double().numpy()
    top, rest = values[:, :k], values[:, k]
    if num_classes == k:   # nothing is left over: the target is the top-k alone
        rest = np.zeros_like(rest)
    total = top.sum(1) + rest
    spread = rest / max(num_classes - k, 1)   # each other class's share before normalising
    plogp = (top * np.log(top)).sum(1) + np.where(rest > 0, rest * np.log(np.where(rest > 0, spread, 1)), 0)
    return {"probs": top, "p1": top[:, 0], "p2": top[:, 1] if k > 1 else np.zeros(len(top)), "kept": 1 - rest,
            "cum": np.cumsum(top, axis=1), "entropy": np.log(total) - plogp / total,
            "top1": ids.reshape(-1, k)[:, 0].astype(np.int64)}


def _zeros(n: int):
    return field(default_factory=lambda: np.zeros(n))


@dataclass
class LayerStats:
    """Sums over the crops of one label layer (a store has the ensemble's), merged with ``+``."""

    num_classes: int
    topk: int
    crops: int = 0
    labelled: int = 0           # crops of images with a label
    hits: int = 0               # ... whose top-1 is the label
    p1: float = 0.0             # sums over crops
    entropy: float = 0.0
    kept: float = 0.0
    cum: np.ndarray = None      # (k,) sums of the top-j mass
    p1_hist: np.ndarray = _zeros(BINS)
    kept_hist: np.ndarray = _zeros(BINS)
    entropy_hist: np.ndarray = _zeros(BINS)
    class_crops: np.ndarray = None    # (K,) per class: crops, sums of p1 and entropy, hits
    class_p1: np.ndarray = None
    class_entropy: np.ndarray = None
    class_hits: np.ndarray = None
    disputed: np.ndarray = None       # picks: largest runner-up probability (score: minus it)
    unsure: np.ndarray = None         # picks: smallest top-1 probability

    def __post_init__(self):
        for name in ("class_crops", "class_p1", "class_entropy", "class_hits"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.num_classes))
        if self.cum is None:
            self.cum = np.zeros(self.topk)
        for name in ("disputed", "unsure"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(0, pick_dtype(self.topk)))

    @property
    def max_entropy(self) -> float:
        return math.log(self.num_classes)

    def __add__(self, other: "LayerStats") -> "LayerStats":
        merged = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)
                  if f.name not in ("num_classes", "topk", "disputed", "unsure")}
        return LayerStats(self.num_classes, self.topk, **merged,
                          disputed=lowest(np.concatenate([self.disputed, other.disputed])),
                          unsure=lowest(np.concatenate([self.unsure, other.unsure])))


def lowest(picks: np.ndarray, n: int = PICKS) -> np.ndarray:
    """The ``n`` picks of lowest score, lowest first (ties: earliest round, image, crop)."""
    return np.sort(picks, order=["score", "round", "image", "crop"])[:n]


def round_stats(round_: int, boxes: np.ndarray, flips: np.ndarray, ids: np.ndarray, codes: np.ndarray,
                labels: np.ndarray, num_classes: int) -> LayerStats:
    """The sums of one round: ``boxes`` (N, C, 4), ``flips`` (N, C), ``ids`` (N, C, k), ``codes`` (N, C, k+1) as
    stored, ``labels`` (N,) the images' class ids (-1: none)."""
    n, c, k = ids.shape
    m = crop_measures(ids, codes, num_classes)
    label = np.repeat(labels, c)
    has_label = label >= 0
    # per class: the labelled crops by their image's label; in a store without labels, every crop by its top-1
    cls, counted = (label, has_label) if has_label.any() else (m["top1"], np.ones_like(has_label))
    hit = has_label & (m["top1"] == label)
    per_class = lambda w: np.bincount(cls[counted], weights=w[counted], minlength=num_classes)
    hist = lambda v, hi: np.histogram(np.clip(v, 0, hi), bins=BINS, range=(0, hi))[0].astype(float)
    stats = LayerStats(
        num_classes, k, crops=n * c, labelled=int(has_label.sum()), hits=int(hit.sum()), p1=float(m["p1"].sum()),
        entropy=float(m["entropy"].sum()), kept=float(m["kept"].sum()), cum=m["cum"].sum(0),
        p1_hist=hist(m["p1"], 1), kept_hist=hist(m["kept"], 1), entropy_hist=hist(m["entropy"], math.log(num_classes)),
        class_crops=per_class(np.ones(n * c)), class_p1=per_class(m["p1"]), class_entropy=per_class(m["entropy"]),
        class_hits=per_class(hit.astype(float)))
    for name, score in (("disputed", -m["p2"]), ("unsure", m["p1"])):
        at = np.argsort(score, kind="stable")[:PICKS]
        picks = np.zeros(len(at), pick_dtype(k))
        picks["score"], picks["round"], picks["image"], picks["crop"] = score[at], round_, at // c, at % c
        picks["box"], picks["flip"] = boxes.reshape(-1, 4)[at], flips.reshape(-1)[at]
        picks["ids"], picks["probs"] = ids.reshape(-1, k)[at], m["probs"][at]
        setattr(stats, name, picks)
    return stats


@dataclass(frozen=True)
class ClassRow:
    name: str
    crops: int
    p1: float
    entropy: float
    accuracy: float | None   # share of crops whose top-1 is the label; None without labels


def class_rows(stats: LayerStats, classes: list[str]) -> list[ClassRow]:
    """Per class means, in class-id order (classes without crops left out)."""
    n = np.maximum(stats.class_crops, 1)
    return [ClassRow(classes[c], int(stats.class_crops[c]), stats.class_p1[c] / n[c], stats.class_entropy[c] / n[c],
                     stats.class_hits[c] / n[c] if stats.labelled else None)
            for c in np.flatnonzero(stats.class_crops)]
