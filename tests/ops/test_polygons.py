"""Polygon area, IoU and IoF against hand-worked cases (a non-convex dart among them), a rasterised brute
force on random quads, and torchvision's rotated IoU on generic rectangle pairs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from monatune.ops import (
    le90_to_cxcywhr,
    le90_to_polygons,
    polygon_area,
    polygon_iof,
    polygon_iou,
)

SQUARE = [0.0, 0.0, 10.0, 0.0, 10.0, 10.0, 0.0, 10.0]  # clockwise on screen (y down)
SHIFTED = [5.0, 0.0, 15.0, 0.0, 15.0, 10.0, 5.0, 10.0]
DART = [0.0, 0.0, 10.0, 5.0, 0.0, 10.0, 4.0, 5.0]  # non-convex: reflex corner at (4, 5); area 50 - 20 = 30


def _reverse(polygon):
    points = np.asarray(polygon, dtype=float).reshape(-1, 2)[::-1]
    return points.reshape(-1).tolist()


def _t(*polygons):
    return torch.tensor(polygons, dtype=torch.float64)


def test_polygon_area_either_orientation_and_degenerate():
    polygons = _t(SQUARE, _reverse(SQUARE), DART, _reverse(DART), [0, 0, 1, 1, 2, 2, 3, 3], [1, 1] * 4)
    assert polygon_area(polygons).tolist() == [100.0, 100.0, 30.0, 30.0, 0.0, 0.0]
    assert polygon_area(torch.tensor([[0.0, 0.0, 4.0, 0.0, 0.0, 3.0]])).tolist() == [6.0]  # a triangle
    with pytest.raises(ValueError, match=r"\[N, 2k\]"):
        polygon_area(torch.zeros(2, 5))


def test_polygon_iou_hand_cases_in_either_orientation():
    for subject in (SQUARE, _reverse(SQUARE)):
        for clip in (SHIFTED, _reverse(SHIFTED)):
            assert polygon_iou(_t(subject), _t(clip)).item() == pytest.approx(50 / 150)
    assert polygon_iou(_t(SQUARE), _t(SQUARE)).item() == pytest.approx(1.0)
    far = [100.0, 100.0, 101.0, 100.0, 101.0, 101.0, 100.0, 101.0]
    iou = polygon_iou(_t(SQUARE, SHIFTED), _t(SHIFTED, far, SQUARE))
    torch.testing.assert_close(iou, _t([1 / 3, 0, 1], [1, 0, 1 / 3]))


def test_non_convex_dart_against_convex_windows():
    # the dart between x = 0 and 4 is two wings, each 0.75 x wide; from x = 4 to 10 it is 10 - x tall.
    # x >= 5: the triangle (5, 2.5) (10, 5) (5, 7.5), area 12.5; x <= 2: 2 * 0.75 * 2^2 / 2 = 3
    right = [5.0, 0.0, 10.0, 0.0, 10.0, 10.0, 5.0, 10.0]
    for dart in (DART, _reverse(DART), DART[2:] + DART[:2]):
        assert polygon_iou(_t(dart), _t(right)).item() == pytest.approx(12.5 / (30 + 50 - 12.5))
        assert polygon_iou(_t(dart), _t(SQUARE)).item() == pytest.approx(30 / 100)  # the dart lies inside
        assert polygon_iof(_t(dart), (5, 0, 10, 10)).item() == pytest.approx(12.5 / 30)
        assert polygon_iof(_t(dart), (0, 0, 2, 10)).item() == pytest.approx(3 / 30)
        assert polygon_iof(_t(dart), (-1, -1, 11, 11)).item() == pytest.approx(1.0)
        # a window cutting through both wings and the reflex corner: x <= 6 gives 30 - 8 (the tip, 4 x 4 / 2)
        assert polygon_iof(_t(dart), (-5, -5, 6, 20)).item() == pytest.approx(22 / 30)


def test_degenerate_polygons_give_zero_not_nan():
    flat = [0.0, 0.0, 5.0, 5.0, 10.0, 10.0, 5.0, 5.0]
    point = [3.0, 3.0] * 4
    iou = polygon_iou(_t(flat, point, SQUARE), _t(SQUARE, flat))
    assert iou.tolist() == [[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]
    assert polygon_iof(_t(flat, point, SQUARE), (0, 0, 10, 10)).tolist() == [0.0, 0.0, 1.0]
    assert polygon_iof(_t(SQUARE), (5, 0, 5, 10)).tolist() == [0.0]  # a window of zero width
    assert polygon_iou(torch.zeros(0, 8), _t(SQUARE)).shape == (0, 1)
    assert polygon_iof(torch.zeros(0, 8), (0, 0, 1, 1)).shape == (0,)
    with pytest.raises(ValueError, match="x1 <= x2"):
        polygon_iof(_t(SQUARE), (10, 0, 0, 10))


def _star_quads(n, rng, centre=20.0, radius=(2.0, 15.0)):
    """Simple quads (star-shaped about a point, so often non-convex) in random orientation."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=(4 * n, 4)), axis=1)
    gaps = np.diff(np.concatenate([angles, angles[:, :1] + 2 * np.pi], axis=1), axis=1)
    angles = angles[(gaps < 0.9 * np.pi).all(1)][:n]  # the centre sees every edge: the quad is simple
    radii = rng.uniform(*radius, size=(n, 4))
    points = np.stack([centre + radii * np.cos(angles), centre + radii * np.sin(angles)], axis=-1)
    flip = rng.random(n) < 0.5
    points[flip] = points[flip, ::-1]
    return points.reshape(n, 8)


def _inside(polygon, x, y):
    """Even-odd point-in-polygon test on a grid."""
    points = polygon.reshape(-1, 2)
    result = np.zeros_like(x, dtype=bool)
    for (x0, y0), (x1, y1) in zip(points, np.roll(points, -1, axis=0)):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        result ^= crosses & (x < at)
    return result


def _signed_turns(quad):
    """True if all turns of the quad have one sign (convex)."""
    p = quad.reshape(-1, 2)
    edges = np.roll(p, -1, axis=0) - p
    turns = edges[:, 0] * np.roll(edges, -1, axis=0)[:, 1] - edges[:, 1] * np.roll(edges, -1, axis=0)[:, 0]
    return bool((turns > 0).all() or (turns < 0).all())


def test_polygon_iou_and_iof_match_a_rasterised_brute_force():
    rng = np.random.default_rng(0)
    subjects = np.concatenate([_star_quads(11, rng), np.array([DART]) * 1.5 + 12])  # and a dart, surely non-convex
    boxes = torch.tensor(np.concatenate([rng.uniform(10, 30, (12, 2)), rng.uniform(4, 25, (12, 2)),
                                         rng.uniform(-1.5, 1.5, (12, 1))], axis=1))  # fmt: skip
    clips = le90_to_polygons(boxes).numpy()
    iou = polygon_iou(torch.tensor(subjects), torch.tensor(clips)).numpy()
    iof = polygon_iof(torch.tensor(subjects), (12.0, 8.0, 30.0, 26.0)).numpy()
    step = 0.05
    y, x = np.mgrid[-10:50:step, -10:50:step] + step / 2  # holds every polygon
    window = (x >= 12) & (x <= 30) & (y >= 8) & (y <= 26)
    clip_masks = [_inside(clip, x, y) for clip in clips]
    assert all(not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()) for m in clip_masks)
    for i, subject in enumerate(subjects):
        s = _inside(subject, x, y)
        assert iof[i] == pytest.approx((s & window).sum() / s.sum(), abs=0.01)
        for j, c in enumerate(clip_masks):
            assert iou[i, j] == pytest.approx((s & c).sum() / (s | c).sum(), abs=0.01), (i, j)
    assert (iou > 0.05).sum() > 30 and (iou == 0).sum() >= 3  # overlaps of all kinds, and some disjoint pairs
    convex = [_signed_turns(q) for q in subjects]
    assert 3 <= sum(not c for c in convex) <= 9  # non-convex subjects among them (the dart and others)


def test_rectangle_iou_matches_torchvisions_kernel_on_generic_pairs():
    g = torch.Generator().manual_seed(1)
    boxes = torch.cat([torch.rand(60, 2, generator=g) * 40, torch.rand(60, 2, generator=g) * 20 + 1,
                       (torch.rand(60, 1, generator=g) - 0.5) * math.pi], dim=1).double()  # fmt: skip
    ours = polygon_iou(le90_to_polygons(boxes), le90_to_polygons(boxes))
    theirs = box_iou(le90_to_cxcywhr(boxes), le90_to_cxcywhr(boxes), fmt="cxcywhr")
    torch.testing.assert_close(ours.float(), theirs, atol=1e-5, rtol=0)  # the kernel works in float32
    assert ((ours > 0) & (ours < 1)).sum() > 100
    assert polygon_iou(le90_to_polygons(boxes.float()), le90_to_polygons(boxes.float())).dtype == torch.float32
