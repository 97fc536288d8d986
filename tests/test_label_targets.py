"""Soft-label codes: top-k + leftover codes rebuild the fp32 top-k target within 1e-3 KL."""
from __future__ import annotations

import pytest
import torch

from mealv2.common.data.targets import PROB_LEVELS, decode_probs, encode_topk, ensemble_probs, reconstruct_targets


def _topk_target(p: torch.Tensor, k: int) -> torch.Tensor:
    """The fp32 reference: exact top-k, the exact leftover spread evenly over the rest."""
    top, ids = p.topk(k, dim=1)
    rest = ((1 - top.sum(1, keepdim=True)) / (p.shape[1] - k)).clamp_min(0)
    target = rest.expand(-1, p.shape[1]).clone()
    target.scatter_(1, ids, top)
    return target


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    p, q = p.double(), q.double()
    return torch.xlogy(p, p).sum(1) - (p * q.log()).sum(1)


def _softmax_batch(temperature_scale: float, n: int = 2048, classes: int = 1000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, classes, generator=g, dtype=torch.float64) * temperature_scale, 1).float()


@pytest.mark.parametrize("k", [5, 10])
@pytest.mark.parametrize("scale", [0.5, 2.0, 5.0, 20.0, 200.0])
def test_rebuilt_target_is_within_1e3_kl_of_the_fp32_topk_target(k, scale):
    # logit scale 0.5 -> nearly flat (top-1 ~0.003); 200 -> top-1 ~0.99 with a tiny leftover
    p = _softmax_batch(scale)
    ids, codes = encode_topk(p, k)
    q = reconstruct_targets(ids, codes, p.shape[1])
    kl = _kl(_topk_target(p, k), q)
    assert torch.isfinite(kl).all()
    assert kl.max() < 1e-3, float(kl.max())


def test_confident_crops_keep_their_leftover_mass():
    # p1 = 0.999: the top-1 code alone is uncertain by more than the leftover 0.001;
    # a target rebuilt from 1 - sum(decoded top-k) gets the leftover badly wrong.
    p = torch.full((1, 1000), 0.001 / 999)
    p[0, 7] = 0.999
    ids, codes = encode_topk(p, 5)
    q = reconstruct_targets(ids, codes, 1000)
    rest = q[0].clone()
    rest[ids[0]] = 0
    assert rest.sum().item() == pytest.approx(0.001 - 4 * 0.001 / 999, rel=0.1)
    assert (q > 0).all()


def test_rows_sum_to_one_and_topk_sits_at_the_ids():
    p = _softmax_batch(3.0, n=256, classes=50)
    ids, codes = encode_topk(p, 4)
    assert ids.dtype == torch.int64 and ids.shape == (256, 4)
    assert codes.dtype == torch.uint8 and codes.shape == (256, 5)
    assert (codes <= PROB_LEVELS).all()
    q = reconstruct_targets(ids, codes, 50)
    assert q.shape == (256, 50)
    torch.testing.assert_close(q.sum(1), torch.ones(256))
    # the top-k ids carry the k largest target values, in the stored order
    top_vals, top_ids = q.topk(4, dim=1)
    assert torch.equal(top_ids, ids) or torch.equal(q.gather(1, ids), top_vals)
    # ids are the true top-k, in descending probability
    assert torch.equal(ids, p.topk(4, dim=1).indices)
    # the other classes share one value
    mask = torch.ones_like(q, dtype=torch.bool).scatter_(1, ids, False)
    others = q[mask].reshape(256, 46)
    assert torch.equal(others, others[:, :1].expand_as(others))


def test_codes_are_square_root_codes():
    p = torch.tensor([[0.64, 0.25, 0.09, 0.02]])
    ids, codes = encode_topk(p, 2)
    assert ids.tolist() == [[0, 1]]
    expected = [round(PROB_LEVELS * v ** 0.5) for v in (0.64, 0.25, 0.11)]
    assert codes.tolist() == [expected]
    torch.testing.assert_close(decode_probs(codes)[0, :2], torch.tensor([0.64, 0.25]), atol=1 / PROB_LEVELS, rtol=0)


def test_code_zero_decodes_to_a_small_positive_probability():
    q = decode_probs(torch.tensor([0, 1], dtype=torch.uint8))
    assert 0 < q[0] < (0.5 / PROB_LEVELS) ** 2 < q[1]
    # a top-k entry coded 0 still gets probability in the rebuilt target: finite KL
    p = torch.zeros(1, 20)
    p[0, 0], p[0, 1] = 1 - 1e-7, 1e-7
    ids, codes = encode_topk(p, 2)
    assert codes[0, 1] == 0
    q = reconstruct_targets(ids, codes, 20)
    assert (q > 0).all() and torch.isfinite(_kl(_topk_target(p, 2), q)).all()


def test_k_equal_to_class_count_has_no_leftover_classes():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    ids, codes = encode_topk(p, 3)
    q = reconstruct_targets(ids, codes, 3)
    torch.testing.assert_close(q, p, atol=5e-3, rtol=0)
    torch.testing.assert_close(q.sum(1), torch.ones(1))


def test_ensemble_is_a_weighted_mean_of_softmaxes_with_temperature():
    a, b = torch.randn(4, 10), torch.randn(4, 10)
    p = ensemble_probs([a, b], [1.0, 3.0], temperature=2.0)
    expected = (torch.softmax(a / 2, 1) + 3 * torch.softmax(b / 2, 1)) / 4
    torch.testing.assert_close(p, expected)
    # averaged in probability space, not logit space
    assert not torch.allclose(p, torch.softmax((a + 3 * b) / 8, 1), atol=1e-3)
