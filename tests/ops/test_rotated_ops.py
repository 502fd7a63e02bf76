"""le90 conversions (against the numbers of the spec and torchvision), minimum-area rectangles (against a
brute-force search over angles) and rotated NMS (against a brute-force greedy pass on the full IoU matrix)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_convert, box_iou

from monatune.ops import (
    batched_rotated_nms,
    cxcywhr_to_le90,
    le90_to_cxcywhr,
    le90_to_hbb,
    le90_to_polygons,
    norm_le90,
    polygon_iou,
    polygons_to_le90,
    rotated_box_iou,
    rotated_nms,
)

TV_CORNERS = [27.68, 51.34, 62.32, 31.34, 72.32, 48.66, 37.68, 68.66]  # box_convert of tv (50, 50, 40, 20, 30)


def _random_le90(n, seed, *, extent=100.0, size=(2.0, 30.0)):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(n, 2, generator=g) * extent
    sides = torch.rand(n, 2, generator=g) * (size[1] - size[0]) + size[0]
    theta = (torch.rand(n, 1, generator=g) - 0.5) * math.pi
    return torch.cat([centres, sides, theta], dim=1)


# ---- conversions ----


def test_spec_example_tv_and_le90_give_the_same_corners():
    tv = torch.tensor([[50.0, 50.0, 40.0, 20.0, 30.0]])
    torch.testing.assert_close(box_convert(tv, "cxcywhr", "xyxyxyxy")[0], torch.tensor(TV_CORNERS), atol=0.01, rtol=0)
    le90 = torch.tensor([[50.0, 50.0, 40.0, 20.0, -math.pi / 6]])
    corners = le90_to_polygons(le90)[0]
    torch.testing.assert_close(corners[:4], torch.tensor(TV_CORNERS[:4]), atol=0.01, rtol=0)  # p1, p2 as the spec
    torch.testing.assert_close(corners, torch.tensor(TV_CORNERS), atol=0.01, rtol=0)  # and p3, p4 too
    torch.testing.assert_close(le90_to_cxcywhr(le90), tv)
    torch.testing.assert_close(cxcywhr_to_le90(tv), le90)


def test_positive_theta_turns_clockwise_on_screen():
    # w-axis (cos t, sin t) with y down: at t = +30 deg the second corner is below-right of the first
    corners = le90_to_polygons(torch.tensor([[0.0, 0.0, 2.0, 0.0, math.pi / 6]]))[0]
    dx, dy = (corners[2] - corners[0]).item(), (corners[3] - corners[1]).item()
    assert dx == pytest.approx(math.sqrt(3)) and dy == pytest.approx(1.0)


def test_cxcywhr_to_le90_swaps_tall_boxes_and_wraps():
    tv = torch.tensor([[50.0, 50.0, 20.0, 40.0, 30.0], [0.0, 0.0, 2.0, 4.0, 0.0], [0.0, 0.0, 4.0, 2.0, -90.0],
                       [0.0, 0.0, 4.0, 2.0, 270.0]])  # fmt: skip
    expected = torch.tensor([[50.0, 50.0, 40.0, 20.0, -math.pi / 6 + math.pi / 2], [0.0, 0.0, 4.0, 2.0, -math.pi / 2],
                             [0.0, 0.0, 4.0, 2.0, -math.pi / 2], [0.0, 0.0, 4.0, 2.0, -math.pi / 2]])  # fmt: skip
    torch.testing.assert_close(cxcywhr_to_le90(tv), expected)


def test_round_trips_describe_the_same_rectangle():
    g = torch.Generator().manual_seed(0)
    tv = torch.cat([torch.rand(80, 2, generator=g) * 100, torch.rand(80, 2, generator=g) * 30 + 1,
                    (torch.rand(80, 1, generator=g) - 0.5) * 720], dim=1)  # fmt: skip
    le90 = cxcywhr_to_le90(tv)
    assert (le90[:, 2] >= le90[:, 3]).all()
    assert ((le90[:, 4] >= -math.pi / 2) & (le90[:, 4] < math.pi / 2)).all()
    # compared by exact polygon IoU: torchvision's rotated kernel is unreliable for coincident edges
    original = box_convert(tv, "cxcywhr", "xyxyxyxy").double()
    same = polygon_iou(original, le90_to_polygons(le90.double())).diagonal()
    torch.testing.assert_close(same, torch.ones(80, dtype=torch.float64), atol=1e-4, rtol=0)
    back = box_convert(le90_to_cxcywhr(le90), "cxcywhr", "xyxyxyxy").double()
    torch.testing.assert_close(polygon_iou(original, back).diagonal(), same, atol=1e-4, rtol=0)
    # and the sign matters: reading le90 angles as torchvision's gives other rectangles
    wrong = polygon_iou(original, box_convert(le90, "cxcywhr", "xyxyxyxy").double()).diagonal()
    assert (wrong < 0.99).float().mean() > 0.8


def test_norm_le90_range_and_values():
    theta = torch.tensor([0.0, math.pi / 2, -math.pi / 2, math.pi, 3 * math.pi / 2, -math.pi / 2 - 1e-7, 1.0])
    wrapped = norm_le90(theta)
    torch.testing.assert_close(wrapped[[0, 1, 2, 3, 4, 6]],
                               torch.tensor([0.0, -math.pi / 2, -math.pi / 2, 0.0, -math.pi / 2, 1.0]))  # fmt: skip
    assert (wrapped < math.pi / 2).all() and (wrapped >= -math.pi / 2 - 1e-6).all()
    dense = norm_le90(torch.linspace(-10, 10, 100001, dtype=torch.float64))
    assert (dense < math.pi / 2).all() and (dense >= -math.pi / 2).all()


def test_le90_to_hbb_hand_cases_and_against_corners():
    boxes = torch.tensor([[5.0, 6.0, 10.0, 4.0, 0.0], [5.0, 6.0, 10.0, 4.0, -math.pi / 2],
                          [0.0, 0.0, 4.0, 4.0, math.pi / 4]])  # fmt: skip
    expected = torch.tensor([[5.0, 6.0, 10.0, 4.0, 0.0], [5.0, 6.0, 10.0, 4.0, -math.pi / 2],
                             [0.0, 0.0, 4 * math.sqrt(2), 4 * math.sqrt(2), 0.0]])  # fmt: skip
    torch.testing.assert_close(le90_to_hbb(boxes), expected)
    boxes = _random_le90(100, 1)
    corners = le90_to_polygons(boxes).reshape(-1, 4, 2)
    extents = corners.amax(1) - corners.amin(1)
    hbb = le90_to_hbb(boxes)
    torch.testing.assert_close(hbb[:, 2], extents.amax(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(hbb[:, 3], extents.amin(1), atol=1e-4, rtol=0)
    assert torch.equal(hbb[:, 4] == 0, extents[:, 0] >= extents[:, 1])


def test_rotated_box_iou_known_values():
    square = torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.0]])
    turned = torch.tensor([[0.0, 0.0, 10.0, 10.0, math.pi / 4]])
    half = torch.tensor([[5.0, 0.0, 10.0, 10.0, 0.0], [0.0, 0.0, 0.0, 10.0, 0.0]])  # half overlap; zero width
    assert rotated_box_iou(square, turned).item() == pytest.approx(math.sqrt(2) / 2, abs=1e-5)
    torch.testing.assert_close(rotated_box_iou(square, half), torch.tensor([[1 / 3, 0.0]]))
    assert rotated_box_iou(square, torch.zeros(0, 5)).shape == (1, 0)
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        rotated_box_iou(torch.zeros(2, 4), square)


# ---- minimum-area rectangles ----


def _brute_force_min_area(points, steps=36000):
    """Smallest bounding-rectangle area over directions 0 .. 180 deg in 0.005 deg steps."""
    angles = np.linspace(0, np.pi, steps, endpoint=False)
    u = np.stack([np.cos(angles), np.sin(angles)], 1)
    v = np.stack([-u[:, 1], u[:, 0]], 1)
    pu, pv = points @ u.T, points @ v.T  # 4, steps
    return ((pu.max(0) - pu.min(0)) * (pv.max(0) - pv.min(0))).min()


def test_rectangles_are_recovered_from_corners_in_any_order():
    boxes = _random_le90(300, 2, size=(3.0, 40.0))
    boxes[:, 2:4] = torch.sort(boxes[:, 2:4], dim=1, descending=True).values  # w >= h, as ground truth
    corners = le90_to_polygons(boxes).reshape(-1, 4, 2)
    for order in ([0, 1, 2, 3], [2, 3, 0, 1], [3, 2, 1, 0], [1, 0, 3, 2]):  # start anywhere, either orientation
        found = polygons_to_le90(corners[:, order].reshape(-1, 8))
        torch.testing.assert_close(found[:, :4], boxes[:, :4], atol=1e-3, rtol=0)
        difference = norm_le90(found[:, 4].double() - boxes[:, 4].double() + 1e-9)
        assert difference.abs().max() < 1e-4  # the same angle modulo pi
        assert ((found[:, 4] >= -math.pi / 2) & (found[:, 4] < math.pi / 2)).all()


def test_irregular_and_non_convex_quads_match_a_brute_force_search():
    rng = np.random.default_rng(3)
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=(60, 4)), axis=1)  # star-shaped, often non-convex
    radii = rng.uniform(1, 20, size=(60, 4))
    points = np.stack([50 + radii * np.cos(angles), 50 + radii * np.sin(angles)], axis=-1)
    found = polygons_to_le90(points.reshape(-1, 8))
    assert isinstance(found, torch.Tensor) and found.dtype == torch.float32
    assert (found[:, 2] >= found[:, 3]).all()
    corners = le90_to_polygons(found.double()).reshape(-1, 4, 2).numpy()
    for k in range(len(points)):
        best = _brute_force_min_area(points[k])
        area = float(found[k, 2] * found[k, 3])
        # no larger than the best sampled angle's (float32 slack), and smaller by no more than sampling allows
        assert best * (1 - 1e-3) <= area <= best * (1 + 1e-5) + 1e-3
        # every point lies inside the rectangle
        c, u = corners[k, 0], corners[k, 1] - corners[k, 0]
        v = corners[k, 3] - corners[k, 0]
        s, t = (points[k] - c) @ u / (u @ u), (points[k] - c) @ v / (v @ v)
        assert (s > -1e-4).all() and (s < 1 + 1e-4).all() and (t > -1e-4).all() and (t < 1 + 1e-4).all()


def test_min_area_rect_hand_cases_and_degenerate_polygons():
    polygons = torch.tensor([
        [0.0, 0.0, 10.0, 0.0, 10.0, 4.0, 0.0, 4.0],  # wide axis-aligned
        [0.0, 0.0, 0.0, 10.0, 4.0, 10.0, 4.0, 0.0],  # tall, counter-clockwise on screen
        [0.0, 0.0, 4.0, 4.0, 0.0, 8.0, 2.0, 4.0],  # a dart: hull is the triangle (0,0) (4,4) (0,8)
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # one point
        [0.0, 0.0, 3.0, 4.0, 6.0, 8.0, 3.0, 4.0],  # a segment
    ])  # fmt: skip
    found = polygons_to_le90(polygons)
    torch.testing.assert_close(found[0], torch.tensor([5.0, 2.0, 10.0, 4.0, 0.0]))
    torch.testing.assert_close(found[1], torch.tensor([2.0, 5.0, 10.0, 4.0, -math.pi / 2]))
    # the dart's hull, triangle (0,0) (4,4) (0,8): along (0,0)-(0,8) the rectangle is 8 x 4, along either
    # other side sqrt(32) x sqrt(32); area 32 either way
    assert float(found[2, 2] * found[2, 3]) == pytest.approx(32.0, rel=1e-5)
    torch.testing.assert_close(found[3], torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(found[4], torch.tensor([3.0, 4.0, 10.0, 0.0, math.atan2(4, 3)]))
    assert not found.isnan().any()
    assert polygons_to_le90(torch.zeros(0, 8)).shape == (0, 5)
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        polygons_to_le90(torch.zeros(3, 6))


# ---- rotated NMS ----


def brute_force_nms(boxes, scores, threshold, idxs=None):
    """The textbook greedy pass on the full IoU matrix (row: the kept box, column: the candidate)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = box_iou(le90_to_cxcywhr(boxes[order]), le90_to_cxcywhr(boxes[order]), fmt="cxcywhr")
    same = torch.ones_like(iou, dtype=torch.bool) if idxs is None else idxs[order][:, None] == idxs[order][None]
    removed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if removed[i]:
            continue
        keep.append(int(order[i]))
        removed |= (iou[i] > threshold) & same[i]
    return keep


def _clustered_case(seed, n=400, clusters=40):
    """Boxes jittered around a few centres, so that many overlap; scores with many ties."""
    g = torch.Generator().manual_seed(seed)
    base = _random_le90(clusters, seed, extent=300.0, size=(4.0, 40.0))
    boxes = base[torch.randint(0, clusters, (n,), generator=g)]
    boxes = boxes + torch.randn(n, 5, generator=g) * torch.tensor([3.0, 3.0, 2.0, 2.0, 0.2])
    boxes[:, 2:4] = boxes[:, 2:4].abs() + 0.5
    scores = torch.randint(0, 20, (n,), generator=g).float() / 20  # ties in score
    return boxes, scores


@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.4, 0.7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rotated_nms_equals_the_brute_force_greedy_pass(seed, threshold):
    boxes, scores = _clustered_case(seed)
    keep = rotated_nms(boxes, scores, threshold)
    expected = brute_force_nms(boxes, scores, threshold)
    assert keep.tolist() == expected
    assert keep.dtype == torch.long
    assert 10 < len(expected) < len(boxes)  # some suppression, some kept
    kept_scores = scores[keep]
    assert (kept_scores[:-1] >= kept_scores[1:]).all()


@pytest.mark.parametrize("seed", [3, 4])
def test_batched_rotated_nms_equals_per_class_brute_force(seed):
    boxes, scores = _clustered_case(seed)
    idxs = torch.randint(0, 3, (len(boxes),), generator=torch.Generator().manual_seed(seed))
    keep = batched_rotated_nms(boxes, scores, idxs, 0.3)
    assert keep.tolist() == brute_force_nms(boxes, scores, 0.3, idxs)
    per_class = set()
    for c in range(3):
        members = (idxs == c).nonzero()[:, 0]
        per_class |= {int(members[k]) for k in rotated_nms(boxes[members], scores[members], 0.3)}
    assert set(keep.tolist()) == per_class
    assert len(keep) > len(rotated_nms(boxes, scores, 0.3))  # classes do not suppress each other


def test_rotated_nms_hand_case_empty_and_single_box():
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0, 0.0],
        [0.0, 0.0, 10.0, 10.0, math.pi / 4],  # IoU 0.7071 with the first
        [5.0, 0.0, 10.0, 10.0, 0.0],  # IoU 1/3 with the first
        [100.0, 100.0, 4.0, 2.0, 0.3],  # far away
    ])  # fmt: skip
    scores = torch.tensor([0.9, 0.8, 0.95, 0.1])
    # by score: 2 (kept), 0 (IoU 1/3 with 2 -> kept at 0.5), 1 (IoU .71 with 0 -> gone), 3 (kept)
    assert rotated_nms(boxes, scores, 0.5).tolist() == [2, 0, 3]
    assert rotated_nms(boxes, scores, 0.3).tolist() == [2, 1, 3]  # 0 goes (1/3 > .3); 1 overlaps 2 by less
    assert rotated_nms(boxes, scores, 0.75).tolist() == [2, 0, 1, 3]
    assert rotated_nms(torch.zeros(0, 5), torch.zeros(0), 0.5).tolist() == []
    assert batched_rotated_nms(torch.zeros(0, 5), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).tolist() == []
    assert rotated_nms(boxes[:1], scores[:1], 0.5).tolist() == [0]
    with pytest.raises(ValueError, match=r"`scores` must have shape \[4\]"):
        rotated_nms(boxes, scores[:3], 0.5)


def test_rotated_nms_on_many_boxes_spread_over_a_large_image():
    # 2500 separate clusters of 4 near-duplicates on a 20000 x 20000 image: greedy NMS never lets one cluster
    # act on another, so the whole answer is the union of the brute-force answers per cluster
    g = torch.Generator().manual_seed(5)
    grid = torch.stack(torch.meshgrid(torch.arange(50.0), torch.arange(50.0), indexing="ij"), -1).reshape(-1, 2) * 400
    sides, angles = torch.rand(2500, 2, generator=g) * 55 + 5, (torch.rand(2500, 1, generator=g) - 0.5) * 3
    base = torch.cat([grid + 100, sides, angles], dim=1)
    cluster = torch.arange(2500).repeat(4)
    boxes = base[cluster] + torch.randn(10000, 5, generator=g) * torch.tensor([4.0, 4.0, 2.0, 2.0, 0.1])
    scores = torch.rand(10000, generator=g)
    keep = rotated_nms(boxes, scores, 0.4)
    expected = set()
    for c in range(2500):
        members = (cluster == c).nonzero()[:, 0]
        expected |= {int(members[k]) for k in brute_force_nms(boxes[members], scores[members], 0.4)}
    assert set(keep.tolist()) == expected
    assert 2500 < len(keep) < 10000
    assert (scores[keep][:-1] >= scores[keep][1:]).all()
