import math

import pytest
import torch
from oriented_coders_reference import midpoint_bbox2delta, midpoint_delta2bbox, poly2obb_np_oc_angle_loop
from oriented_coders_reference import norm_angle as release_norm_angle
from oriented_coders_reference import xywha_bbox2delta, xywha_delta2bbox

from monatune.models.oriented.coders import (
    DeltaXYWHACoder,
    MidpointOffsetCoder,
    le90_to_oc,
    norm_angle,
    oc_to_le90,
)
from monatune.ops import le90_to_polygons, norm_le90

PI = math.pi


def random_le90(n: int, generator: torch.Generator, *, min_side: float = 4.0, strict: bool = True) -> torch.Tensor:
    """Random le90 boxes (w > h unless ``strict`` is off, theta in [-pi/2, pi/2))."""
    centre = torch.rand(n, 2, generator=generator) * 200
    sides = min_side + torch.rand(n, 2, generator=generator) * 60
    w, h = sides.max(dim=1).values, sides.min(dim=1).values
    if strict:
        w = w + 1.0
    theta = (torch.rand(n, generator=generator) - 0.5) * PI
    return torch.cat([centre, w[:, None], h[:, None], norm_le90(theta)[:, None]], dim=1)


def assert_same_rectangles(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-3) -> None:
    """Every corner of each box of ``a`` is a corner of the matching box of ``b`` (and vice versa)."""
    ca, cb = le90_to_polygons(a.double()).view(-1, 4, 2), le90_to_polygons(b.double()).view(-1, 4, 2)
    distance = torch.cdist(ca, cb)
    assert distance.amin(dim=2).max() < atol and distance.amin(dim=1).max() < atol


def assert_angles_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    """Angles equal modulo pi (a box turned by pi is the same box)."""
    assert norm_le90(a.double() - b.double()).abs().max() < atol


def assert_boxes_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> None:
    torch.testing.assert_close(a[..., :4], b[..., :4], rtol=1e-5, atol=atol)
    assert_angles_close(a[..., 4], b[..., 4])


# --- angle versions -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["oc", "le90", "le135"])
def test_norm_angle_equals_release(version):
    angle = (torch.rand(1000) - 0.5) * 20
    torch.testing.assert_close(norm_angle(angle, version), release_norm_angle(angle, version), rtol=0, atol=1e-6)
    low = {"le90": -PI / 2, "le135": -PI / 4}.get(version)
    if low is not None:
        result = norm_angle(angle, version)
        assert (result >= low).all() and (result < low + PI).all()


def test_norm_angle_rounding_edge_stays_in_range():
    just_below = torch.tensor([-PI / 2], dtype=torch.float64).nextafter(torch.tensor([-10.0], dtype=torch.float64))
    assert release_norm_angle(just_below, "le90").item() == PI / 2  # the release's result: the open end
    assert norm_angle(just_below, "le90").item() == -PI / 2  # the same box, in range
    with pytest.raises(ValueError, match="le45"):
        norm_angle(just_below, "le45")


def test_le90_to_oc_hand_cases():
    le90 = torch.tensor([
        [0.0, 0.0, 4.0, 2.0, 0.0],  # axis-aligned: oc has a = pi/2 and w the vertical extent
        [0.0, 0.0, 4.0, 2.0, -PI / 4],  # one quarter turn forward: sides swap
        [0.0, 0.0, 4.0, 2.0, PI / 4],  # already in (0, pi/2]
        [0.0, 0.0, 4.0, 2.0, -PI / 2],  # two quarter turns: same sides
    ])  # fmt: skip
    expected = torch.tensor([
        [0.0, 0.0, 2.0, 4.0, PI / 2],
        [0.0, 0.0, 2.0, 4.0, PI / 4],
        [0.0, 0.0, 4.0, 2.0, PI / 4],
        [0.0, 0.0, 4.0, 2.0, PI / 2],
    ])  # fmt: skip
    torch.testing.assert_close(le90_to_oc(le90), expected)
    assert_boxes_close(oc_to_le90(expected), le90)


def test_le90_to_oc_same_rectangles_ranges_and_release_loop():
    g = torch.Generator().manual_seed(1)
    le90 = random_le90(500, g)
    le90[:20, 4] = torch.tensor([-PI / 2, 0.0, -PI / 4, PI / 4] * 5)  # quarter-turn angles
    oc = le90_to_oc(le90)
    assert (oc[:, 4] > 0).all() and (oc[:, 4] <= PI / 2).all()
    assert_same_rectangles(oc, le90)
    assert_boxes_close(oc_to_le90(oc), le90)

    # poly2obb_np_oc's loop on what cv2.minAreaRect returned before OpenCV 4.5.1 (a in [-90, 0)) for these
    # rectangles gives the same (w, h, a); cv2 >= 4.5.1 returns (0, 90] already, which the loop keeps.
    for box, got in zip(le90.tolist(), oc.tolist()):
        w, h, theta = box[2], box[3], box[4]
        if theta >= 0:
            w, h, theta = h, w, theta - PI / 2
        w, h, a = poly2obb_np_oc_angle_loop(w, h, math.degrees(theta))
        assert (w, h) == (got[2], got[3]) and a == pytest.approx(got[4], abs=1e-6)


def test_oc_to_le90_square_keeps_angle():
    torch.testing.assert_close(oc_to_le90(torch.tensor([[1.0, 2.0, 3.0, 3.0, 0.5]])), torch.tensor([[1, 2, 3, 3, 0.5]]))


# --- DeltaXYWHACoder ----------------------------------------------------------------------------------------------


def test_xywha_encode_hand_cases():
    proposals = torch.tensor([[10.0, 20.0, 8.0, 4.0, 0.0], [10.0, 20.0, 8.0, 4.0, PI / 2]])
    gt = torch.tensor([[12.0, 21.0, 16.0, 2.0, 0.1], [12.0, 21.0, 16.0, 2.0, 0.1]])
    plain = DeltaXYWHACoder(version="oc").encode(proposals, gt)
    torch.testing.assert_close(plain[0], torch.tensor([0.25, 0.25, math.log(2), math.log(0.5), 0.1]))
    projected = DeltaXYWHACoder(version="oc", proj_xy=True).encode(proposals, gt)
    # turned into the frame of a proposal at pi/2: along its w-axis (0, 1) the offset is 1, along (-1, 0) it is -2
    torch.testing.assert_close(projected[1, :2], torch.tensor([1 / 8, -2 / 4]))
    torch.testing.assert_close(projected[1, 4], torch.tensor(0.1 - PI / 2))

    swap = DeltaXYWHACoder(version="le90", edge_swap=True)
    got = swap.encode(torch.tensor([[0.0, 0.0, 10.0, 5.0, 0.0]]), torch.tensor([[0.0, 0.0, 20.0, 4.0, PI / 2 - 0.1]]))
    # norm(pi/2 - 0.1) = 1.47 against norm(pi - 0.1) = -0.1: the target is taken turned, its sides swapped
    torch.testing.assert_close(got[0], torch.tensor([0.0, 0.0, math.log(0.4), math.log(4.0), -0.1]))
    scaled = DeltaXYWHACoder(means=(0.1, 0, 0, 0, 0), stds=(0.1, 0.1, 0.2, 0.2, 0.1), version="oc").encode(
        proposals[:1], gt[:1]
    )
    torch.testing.assert_close(scaled[0], torch.tensor([1.5, 2.5, math.log(2) / 0.2, math.log(0.5) / 0.2, 1.0]))


def test_xywha_decode_hand_cases():
    coder = DeltaXYWHACoder(version="le90", edge_swap=True)
    proposals = torch.tensor([[10.0, 20.0, 8.0, 4.0, 0.0]])
    deltas = torch.tensor([[0.5, -0.5, 10.0, 0.0, 0.2]])  # dw clamped at log(1000 / 16)
    got = coder.decode(proposals, deltas)
    torch.testing.assert_close(got[0], torch.tensor([14.0, 18.0, 8 * 1000 / 16, 4.0, 0.2]))
    deltas = torch.tensor([[0.0, 0.0, 0.0, math.log(4.0), 0.2]])  # gw 8 < gh 16: swapped, turned by pi/2
    torch.testing.assert_close(coder.decode(proposals, deltas)[0], torch.tensor([10.0, 20.0, 16.0, 8.0, 0.2 - PI / 2]))
    clamped = coder.decode(proposals, torch.tensor([[-5.0, 5.0, 0.0, 0.0, 0.0]]), max_shape=(30, 25))
    torch.testing.assert_close(clamped[0, :2], torch.tensor([0.0, 29.0]))


OPTIONS = [
    dict(version="oc"),
    dict(version="oc", proj_xy=True),
    dict(version="le90"),
    dict(version="le90", edge_swap=True, proj_xy=True),  # Oriented R-CNN's RoI head
    dict(version="le90", edge_swap=True),
    dict(version="le135", edge_swap=True, proj_xy=True),
]


def _boxes_for(version: str, n: int, g: torch.Generator) -> torch.Tensor:
    boxes = random_le90(n, g)
    if version == "oc":
        return le90_to_oc(boxes)
    if version == "le135":
        boxes[:, 4] = norm_angle(boxes[:, 4], "le135")
    return boxes


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_xywha_equals_release(options):
    g = torch.Generator().manual_seed(2)
    version = options["version"]
    proposals, gt = _boxes_for(version, 400, g), _boxes_for(version, 400, g)
    means, stds = (0.01, -0.02, 0.03, 0.0, 0.05), (0.1, 0.1, 0.2, 0.2, 0.1)
    coder = DeltaXYWHACoder(means, stds, **options)
    release = dict(angle_range=version, edge_swap=options.get("edge_swap", False), proj_xy=options.get("proj_xy", 0))
    deltas = coder.encode(proposals, gt)
    expected = xywha_bbox2delta(proposals, gt, means, stds, **release)
    torch.testing.assert_close(deltas, expected, rtol=1e-5, atol=1e-5)
    if options.get("edge_swap"):
        turned = (norm_angle(gt[:, 4] - proposals[:, 4], version).abs() >= PI / 4).sum()
        assert 50 < turned < 350  # both branches of the edge swap are exercised

    noise = torch.randn(400, 10, generator=g) * 2  # two boxes per proposal, some past the clamps
    decoded = coder.decode(proposals, noise, max_shape=(150, 120))
    expected = xywha_delta2bbox(proposals, noise, means, stds, max_shape=(150, 120), **release)
    assert decoded.shape == (400, 10)
    assert_boxes_close(decoded.view(-1, 5), expected.view(-1, 5))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_xywha_round_trip(options):
    g = torch.Generator().manual_seed(3)
    version = options["version"]
    proposals, gt = _boxes_for(version, 300, g), _boxes_for(version, 300, g)
    coder = DeltaXYWHACoder((0.0, 0.1, 0.0, 0.2, 0.0), (0.1, 0.1, 0.2, 0.2, 0.1), **options)
    decoded = coder.decode(proposals, coder.encode(proposals, gt))
    assert_same_rectangles(decoded, gt)
    if version != "oc" or not options.get("edge_swap"):  # the same description, not only the same rectangle
        assert_boxes_close(decoded, gt, atol=2e-4)


def test_xywha_keeps_float64_and_checks_inputs():
    coder = DeltaXYWHACoder(version="le90")
    boxes = random_le90(5, torch.Generator().manual_seed(0)).double()
    assert coder.encode(boxes, boxes.flip(0)).dtype == torch.float64
    assert coder.decode(boxes, torch.zeros(5, 5, dtype=torch.float64)).dtype == torch.float64
    assert coder.encode(boxes[:0], boxes[:0]).shape == (0, 5)
    with pytest.raises(ValueError, match="same length"):
        coder.encode(boxes, boxes[:3])
    with pytest.raises(ValueError, match=r"\[N, 5 k\]"):
        coder.decode(boxes, torch.zeros(5, 6))
    with pytest.raises(ValueError, match="stds"):
        DeltaXYWHACoder(stds=(1.0, 1.0))


# --- MidpointOffsetCoder ------------------------------------------------------------------------------------------


def test_midpoint_hand_cases():
    coder = MidpointOffsetCoder()  # stds (1, 1, 1, 1, 0.5, 0.5), le90
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [-3.0, -3.0, 3.0, 3.0]])
    gt = torch.tensor([[5.0, 5.0, 4.0, 2.0, 0.0], [0.0, 0.0, 4.0, 2.0, PI / 4]])
    deltas = coder.encode(anchors, gt)
    # axis-aligned: corners (3,4) (7,4) (7,6) (3,6); top side y = 4 holds x = 3 and 7 -> 7; right side x = 7 -> y 6
    torch.testing.assert_close(deltas[0], torch.tensor([0.0, 0.0, math.log(0.4), math.log(0.2), 1.0, 1.0]))
    # 45 degrees: corners (-r/2, -3r/2) (3r/2, r/2) (r/2, 3r/2) (-3r/2, -r/2) with r = sqrt 2; circumscribed 3r x 3r;
    # top vertex x = -r/2, right vertex y = r/2, so da = -1/6, db = 1/6 (before the stds 0.5)
    expected = torch.tensor([0.0, 0.0, math.log(1 / math.sqrt(2)), math.log(1 / math.sqrt(2)), -1 / 3, 1 / 3])
    torch.testing.assert_close(deltas[1], expected)
    assert_boxes_close(coder.decode(anchors, deltas), gt, atol=1e-5)
    # offsets past +-0.5 are clamped; da = db = 0.5 is the axis-aligned box filling the circumscribed one
    clamped = coder.decode(anchors[:1], torch.tensor([[0.0, 0.0, 0.0, 0.0, 3.0, 3.0]]))
    assert_boxes_close(clamped, torch.tensor([[5.0, 5.0, 10.0, 10.0, 0.0]]))


@pytest.mark.parametrize("version", ["le90", "oc", "le135"])
def test_midpoint_equals_release(version):
    g = torch.Generator().manual_seed(4)
    gt = _boxes_for(version, 400, g)
    gt[:40, 4] = {"oc": PI / 2, "le90": 0.0, "le135": 0.0}[version] - 0.002  # within the release's 0.1 px tolerance
    xy = torch.rand(400, 2, generator=g) * 200
    anchors = torch.cat([xy, xy + 8 + torch.rand(400, 2, generator=g) * 80], dim=1)
    means, stds = (0.0, 0.01, 0.0, -0.02, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0, 0.5, 0.5)
    coder = MidpointOffsetCoder(means, stds, version=version)
    deltas = coder.encode(anchors, gt)
    torch.testing.assert_close(deltas, midpoint_bbox2delta(anchors, gt, means, stds, version), rtol=1e-5, atol=1e-5)

    noise = torch.randn(400, 6, generator=g)
    expected = midpoint_delta2bbox(anchors, noise, means, stds, version=version)
    assert_boxes_close(coder.decode(anchors, noise), expected)
    expected = midpoint_delta2bbox(anchors, deltas, means, stds, version=version)
    assert_boxes_close(coder.decode(anchors, deltas), expected)


@pytest.mark.parametrize("version", ["le90", "oc"])
def test_midpoint_round_trip(version):
    g = torch.Generator().manual_seed(5)
    le90 = random_le90(400, g, min_side=8.0)
    le90[:, 4] = torch.where(le90[:, 4] < 0, -0.05, 0.05) + le90[:, 4] * 0.9  # at least 0.05 rad from the axes
    gt = le90_to_oc(le90) if version == "oc" else le90
    xy = torch.rand(400, 2, generator=g) * 200
    anchors = torch.cat([xy, xy + 8 + torch.rand(400, 2, generator=g) * 80], dim=1)
    coder = MidpointOffsetCoder(version=version)
    decoded = coder.decode(anchors, coder.encode(anchors, gt))
    assert_same_rectangles(decoded, gt)
    if version == "oc":
        assert (decoded[:, 4] >= 0).all() and (decoded[:, 4] < PI / 2).all()  # poly2obb_oc's [0, pi/2)
    assert_boxes_close(decoded, gt, atol=2e-3)


def test_midpoint_checks_inputs():
    coder = MidpointOffsetCoder()
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        coder.encode(torch.zeros(3, 5), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"\[3, 6\]"):
        coder.decode(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="version"):
        MidpointOffsetCoder(version="le45")
    assert coder.decode(torch.zeros(0, 4), torch.zeros(0, 6)).shape == (0, 5)
