"""The crop sampler: pure, on the grid, inside the image, with torchvision's distribution."""
from __future__ import annotations

import numpy as np
import pytest

from mealv2.common.data.crops import BOX_GRID, CropParams, boxes_to_relative, sample_crops, snap_to_grid
from mealv2.common.errors import MealV2Error


def _sizes(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(40, 800, n), rng.integers(40, 800, n)], axis=1)


def test_same_arguments_give_the_same_crops():
    sizes, params = _sizes(20), CropParams()
    a = sample_crops(7, 3, np.arange(20), sizes, 5, params)
    b = sample_crops(7, 3, np.arange(20), sizes, 5, params)
    assert a[0].dtype == np.uint16 and a[0].shape == (20, 5, 4)
    assert a[1].dtype == bool and a[1].shape == (20, 5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_an_images_crops_do_not_depend_on_the_other_images_in_the_call():
    sizes, params = _sizes(30), CropParams()
    ids = np.arange(30)
    boxes, flips = sample_crops(1, 0, ids, sizes, 4, params)
    # any subset, in any order, one image at a time: the same crops per image
    pick = np.array([17, 3, 29, 0])
    sub_boxes, sub_flips = sample_crops(1, 0, ids[pick], sizes[pick], 4, params)
    np.testing.assert_array_equal(sub_boxes, boxes[pick])
    np.testing.assert_array_equal(sub_flips, flips[pick])
    for i in pick:
        one_box, one_flip = sample_crops(1, 0, ids[i:i + 1], sizes[i:i + 1], 4, params)
        np.testing.assert_array_equal(one_box[0], boxes[i])
        np.testing.assert_array_equal(one_flip[0], flips[i])


def test_seed_round_and_image_each_change_the_crops():
    sizes, params = _sizes(8), CropParams()
    ids = np.arange(8)
    base = sample_crops(0, 0, ids, sizes, 4, params)[0]
    assert not np.array_equal(base, sample_crops(1, 0, ids, sizes, 4, params)[0])
    assert not np.array_equal(base, sample_crops(0, 1, ids, sizes, 4, params)[0])
    # same size, other image id: other crops
    same_size = np.repeat(sizes[:1], 8, axis=0)
    boxes = sample_crops(0, 0, ids, same_size, 4, params)[0]
    assert len({b.tobytes() for b in boxes}) == 8


def test_boxes_are_on_the_grid_and_inside_the_image():
    sizes = np.concatenate([_sizes(300), [[1, 1], [1, 5000], [5000, 1], [3, 3]]])
    boxes, _ = sample_crops(3, 2, np.arange(len(sizes)), sizes, 8, CropParams(scale=(0.01, 1.0)))
    q = boxes.astype(np.int64)
    assert (q >= 0).all() and (q <= BOX_GRID).all()
    assert (q[..., 2:] >= 1).all(), "empty box"
    assert (q[..., 0] + q[..., 2] <= BOX_GRID).all() and (q[..., 1] + q[..., 3] <= BOX_GRID).all()
    # relative coordinates are exactly q / BOX_GRID
    np.testing.assert_array_equal(boxes_to_relative(boxes), q.astype(np.float32) / BOX_GRID)
    assert boxes_to_relative(boxes).dtype == np.float32
    # snapping a snapped box changes nothing
    np.testing.assert_array_equal(snap_to_grid(boxes_to_relative(boxes).astype(np.float64)), boxes)


def test_snap_to_grid_keeps_boxes_non_empty_and_inside():
    rel = np.array([[0.999, 0.999, 0.0001, 0.5], [0.0, 0.0, 1.0, 1.0], [0.6, 0.2, 0.7, 0.3]])
    q = snap_to_grid(rel).astype(int)
    assert (q[:, 2:] >= 1).all()
    assert (q[:, :2] + q[:, 2:] <= BOX_GRID).all()
    np.testing.assert_array_equal(q[1], [0, 0, BOX_GRID, BOX_GRID])


@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.3, 0.5), (0.5, 2.0))])
def test_area_and_aspect_follow_the_requested_ranges(scale, ratio):
    # large square images so grid snapping and the fallback are negligible
    n, c = 400, 10
    sizes = np.full((n, 2), 2000)
    boxes, _ = sample_crops(0, 0, np.arange(n), sizes, c, CropParams(scale=scale, ratio=ratio))
    rel = boxes_to_relative(boxes).reshape(-1, 4).astype(np.float64)
    area = rel[:, 2] * rel[:, 3]
    aspect = rel[:, 3] / rel[:, 2]           # w / h in pixels (square image)
    tol = 0.01
    assert area.min() >= scale[0] - tol and area.max() <= scale[1] + tol
    assert aspect.min() >= ratio[0] * (1 - tol) and aspect.max() <= ratio[1] * (1 + tol)
    # torchvision draws the area uniformly in [scale] and the aspect log-uniformly in [ratio];
    # with a square image of side >> crop nearly every first try is accepted.
    inside = area <= 1
    assert abs(np.median(area[inside]) - np.mean(scale)) < 0.1 * (scale[1] - scale[0]) + 0.02
    log_aspect = np.log(aspect)
    assert abs(np.median(log_aspect) - np.mean(np.log(ratio))) < 0.1
    # it covers the range, not a corner of it
    assert area.max() - area.min() > 0.7 * (scale[1] - scale[0])


def test_positions_spread_over_the_image():
    n = 500
    boxes, _ = sample_crops(0, 0, np.arange(n), np.full((n, 2), 1000), 4, CropParams(scale=(0.1, 0.1)))
    y = boxes[..., 0].astype(float) / (BOX_GRID - boxes[..., 2])
    x = boxes[..., 1].astype(float) / (BOX_GRID - boxes[..., 3])
    for u in (y.ravel(), x.ravel()):
        assert 0.4 < u.mean() < 0.6 and u.min() < 0.05 and u.max() > 0.95


@pytest.mark.parametrize("flip_prob", [0.0, 0.25, 0.5, 1.0])
def test_flip_rate_follows_flip_prob(flip_prob):
    n, c = 1000, 4
    _, flips = sample_crops(5, 0, np.arange(n), np.full((n, 2), 300), c, CropParams(flip_prob=flip_prob))
    rate = flips.mean()
    assert abs(rate - flip_prob) < 0.03, rate


def test_fallback_for_extreme_aspect_images_stays_in_ratio():
    # a 10 x 1000 strip: no random try fits the ratio range, torchvision takes a central crop
    sizes = np.array([[10, 1000]])
    boxes, _ = sample_crops(0, 0, np.arange(1), sizes, 16, CropParams())
    rel = boxes_to_relative(boxes)[0].astype(np.float64)
    h_px, w_px = rel[:, 2] * 10, rel[:, 3] * 1000
    assert np.allclose(h_px, 10, atol=0.05)
    assert (w_px / h_px <= 4 / 3 * 1.05).all()
    centre = rel[:, 1] + rel[:, 3] / 2
    assert np.allclose(centre, 0.5, atol=0.002)


@pytest.mark.parametrize("kwargs", [dict(res=0), dict(scale=(0.0, 1.0)), dict(scale=(0.5, 0.4)),
                                    dict(scale=(0.1, 1.5)), dict(ratio=(2.0, 1.0)), dict(flip_prob=1.5)])
def test_bad_crop_params_are_refused(kwargs):
    with pytest.raises(ValueError):
        CropParams(**kwargs)


def test_crop_params_round_trip_through_attrs():
    p = CropParams(res=96, scale=(0.2, 0.9), ratio=(0.5, 2.0), flip_prob=0.3)
    assert CropParams.from_attrs(p.to_attrs()) == p


def test_an_interpolation_the_loaders_do_not_render_is_refused():
    """Once accepted and recorded in the store while every loader resized bilinear."""
    with pytest.raises(MealV2Error, match=r"CropParams\(interpolation='bicubic'\): only 'bilinear' is supported: "
                                          r"both loaders .* resize bilinear.* leave interpolation out"):
        CropParams(interpolation="bicubic")
    assert CropParams(interpolation="bilinear") == CropParams()


def test_stores_and_runs_recorded_before_the_refusal_still_open():
    """A store records its crop params; one written with "bilinear" reads back as it was, and one a Python
    caller recorded as "bicubic" (its crops were rendered bilinear like every other) opens as bilinear."""
    recorded = {"res": 32, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "flip_prob": 0.5, "interpolation": "bilinear"}
    assert CropParams.from_attrs(recorded) == CropParams(res=32)
    assert CropParams.from_attrs({**recorded, "interpolation": "bicubic"}) == CropParams(res=32)
