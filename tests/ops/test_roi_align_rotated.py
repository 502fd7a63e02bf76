import math

import numpy as np
import pytest
import torch
from roi_align_rotated_reference import roi_align_rotated_reference, sample_points_reference

from monatune.ops import MultiScaleRotatedRoIAlign, roi_align_rotated


def random_rois(n: int, g: torch.Generator, *, batch: int, height: int, width: int, scale: float, margin: float):
    """RoIs (image pixels) whose sampling points stay ``margin`` feature pixels inside the map (negative: outside)."""
    rois = []
    while len(rois) < n:
        w, h = (2 + torch.rand(2, generator=g) * 10 / scale).tolist()
        theta = ((torch.rand(1, generator=g) - 0.5) * math.pi).item()
        reach = 0.5 * math.hypot(w, h) * scale  # feature pixels from the centre to a corner
        lo, hi = reach + margin + 0.5, (width - 0.5 - reach - margin, height - 0.5 - reach - margin)
        if margin >= 0 and (hi[0] < lo or hi[1] < lo):
            continue
        cx = (lo + torch.rand(1, generator=g).item() * (hi[0] - lo)) / scale if margin >= 0 else None
        cy = (lo + torch.rand(1, generator=g).item() * (hi[1] - lo)) / scale if margin >= 0 else None
        if margin < 0:  # anywhere from outside the left/top edge to outside the right/bottom one
            cx = ((torch.rand(1, generator=g).item() * 1.4 - 0.2) * width) / scale
            cy = ((torch.rand(1, generator=g).item() * 1.4 - 0.2) * height) / scale
        rois.append([float(torch.randint(batch, (1,), generator=g)), cx, cy, w, h, theta])
    return torch.tensor(rois, dtype=torch.float64)


def reference(features, rois, output_size=(7, 7), spatial_scale=1.0, sampling_ratio=2, aligned=True, clockwise=True):
    out = roi_align_rotated_reference(features.double(), rois.double(), *output_size, spatial_scale, sampling_ratio,
                                      aligned, clockwise)  # fmt: skip
    return torch.from_numpy(out)


def test_hand_cases_ramp_maps_and_turning_sense():
    # features equal to the pixel's column (x) and row (y); bilinear sampling reproduces linear maps exactly
    ys, xs = torch.meshgrid(torch.arange(20.0), torch.arange(20.0), indexing="ij")
    features = torch.stack([xs, ys])[None]  # 1, 2, 20, 20
    bins = torch.arange(7.0)
    # an axis-aligned 7 x 7 RoI centred on (10.5, 10.5): aligned moves the centre to pixel 10; bin j is centred at
    # 10 - 3.5 + j + 0.5 = 7 + j along both axes
    upright = roi_align_rotated(features, torch.tensor([[0.0, 10.5, 10.5, 7.0, 7.0, 0.0]]))[0]
    torch.testing.assert_close(upright[0], (7 + bins).expand(7, 7))
    torch.testing.assert_close(upright[1], (7 + bins)[:, None].expand(7, 7))
    # theta = pi/2, clockwise (le90): the w-axis points down the image (0, 1), the h-axis to the left (-1, 0):
    # bin (i, j) is centred at x = 10 - (i - 3), y = 10 + (j - 3)
    turned = roi_align_rotated(features, torch.tensor([[0.0, 10.5, 10.5, 7.0, 7.0, math.pi / 2]]))[0]
    torch.testing.assert_close(turned[0], (13 - bins)[:, None].expand(7, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(turned[1], (7 + bins).expand(7, 7), atol=1e-5, rtol=0)
    # counter-clockwise: the w-axis points up (0, -1)
    ccw = roi_align_rotated(features, torch.tensor([[0.0, 10.5, 10.5, 7.0, 7.0, math.pi / 2]]), clockwise=False)[0]
    torch.testing.assert_close(ccw[1], (13 - bins).expand(7, 7), atol=1e-5, rtol=0)
    # not aligned: no half-pixel shift, so the same RoI reads half a pixel further on
    legacy = roi_align_rotated(features, torch.tensor([[0.0, 10.5, 10.5, 7.0, 7.0, 0.0]]), aligned=False)[0]
    torch.testing.assert_close(legacy[0], (7.5 + bins).expand(7, 7))
    # the docstring's example: the central 4 x 4 pixels of an 8 x 8 map valued 8 y + x, 2 x 2 bins
    example = roi_align_rotated(torch.arange(64.0).reshape(1, 1, 8, 8), torch.tensor([[0.0, 4, 4, 4, 4, 0]]), 2)
    torch.testing.assert_close(example[0, 0], torch.tensor([[22.5, 24.5], [38.5, 40.5]]))


@pytest.mark.parametrize(
    "options",
    [
        dict(),  # the release's: 7 x 7, sampling 2, aligned, clockwise
        dict(spatial_scale=0.25, clockwise=False),
        dict(output_size=(3, 5), sampling_ratio=3, aligned=False),
        dict(output_size=(2, 2), sampling_ratio=0),  # mmcv's adaptive number of points per bin
    ],
    ids=["release", "scale-ccw", "3x5-s3-legacy", "adaptive"],
)
def test_interior_rois_equal_mmcv_kernel(options):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 24, 31, generator=g, dtype=torch.float64)
    scale = options.get("spatial_scale", 1.0)
    rois = random_rois(40, g, batch=2, height=24, width=31, scale=scale, margin=1.0)  # no point near the border
    expected = reference(features, rois, **options)
    got = roi_align_rotated(features, rois, **options)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    got32 = roi_align_rotated(features.float(), rois.float(), **options)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, expected.float(), rtol=0, atol=1e-5)


def test_border_and_outside_rois_equal_mmcv_kernel():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 4, 16, 21, generator=g, dtype=torch.float64)
    rois = random_rois(120, g, batch=2, height=16, width=21, scale=1.0, margin=-1.0)
    rois = torch.cat([rois, torch.tensor([[1.0, -30.0, -30.0, 8.0, 4.0, 0.3]], dtype=torch.float64)])  # all outside
    points = sample_points_reference(rois, 7, 7, 1.0, 2)
    x, y = points[:, 0], points[:, 1]
    band = ((x >= -1) & (x < 0)) | ((x > 20) & (x <= 21)) | ((y >= -1) & (y < 0)) | ((y > 15) & (y <= 16))
    dropped = (x < -1) | (x > 21) | (y < -1) | (y > 16)
    assert band.sum() > 200 and dropped.sum() > 1000 and (~band & ~dropped).sum() > 5000  # every rule is used
    expected = reference(features, rois)
    torch.testing.assert_close(roi_align_rotated(features, rois), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(roi_align_rotated(features.float(), rois.float()), expected.float(), rtol=0, atol=1e-5)
    assert (expected[-1] == 0).all()


def test_gradient_is_the_adjoint_and_rois_get_none():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([
        [0.0, 3.2, 2.9, 4.0, 2.5, 0.4],
        [1.0, 6.5, 1.0, 5.0, 3.0, -1.1],  # over the border
        [1.0, 2.0, 4.0, 3.0, 3.0, 1.3],
    ], dtype=torch.float64, requires_grad=True)  # fmt: skip
    assert torch.autograd.gradcheck(
        lambda f: roi_align_rotated(f, rois, output_size=(2, 3), sampling_ratio=2), (features,), eps=1e-6, atol=1e-8
    )
    roi_align_rotated(features, rois, output_size=(2, 3)).sum().backward()
    assert rois.grad is None and features.grad.abs().sum() > 0
    # the gradient of <output, G> is the reference's linear map transposed: check against finite sums exactly
    weights = torch.randn(3, 2, 2, 3, generator=g, dtype=torch.float64)
    grad = torch.autograd.grad((roi_align_rotated(features, rois, output_size=(2, 3)) * weights).sum(), features)[0]
    basis = torch.eye(features.numel(), dtype=torch.float64).view(-1, *features.shape)
    columns = [(reference(e, rois.detach(), (2, 3)) * weights).sum() for e in basis]
    torch.testing.assert_close(grad.flatten(), torch.stack(columns), rtol=0, atol=1e-10)


def test_empty_half_and_bad_inputs():
    features = torch.randn(1, 3, 8, 8)
    assert roi_align_rotated(features, torch.zeros(0, 6)).shape == (0, 3, 7, 7)
    rois = torch.tensor([[0.0, 4.0, 4.0, 4.0, 3.0, 0.2]])
    half = roi_align_rotated(features.bfloat16(), rois)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), roi_align_rotated(features.bfloat16().float(), rois).bfloat16().float())
    with pytest.raises(ValueError, match=r"\[K, 6\]"):
        roi_align_rotated(features, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="batch indices"):
        roi_align_rotated(features, torch.tensor([[1.0, 4.0, 4.0, 4.0, 3.0, 0.2]]))
    with pytest.raises(ValueError, match="output_size"):
        roi_align_rotated(features, rois, output_size=(7, 0))


def test_map_levels_hand_cases():
    extractor = MultiScaleRotatedRoIAlign()  # strides 4, 8, 16, 32, finest scale 56
    sides = torch.tensor([
        [10.0, 10.0],  # sqrt(w h) = 10: log2 < 0 -> clamped to 0
        [56.0, 56.0],  # 56 -> 0
        [111.0, 111.0],  # just under 2 x 56 -> 0
        [112.0, 112.0],  # 2 x 56 -> 1
        [2000.0, 10.0],  # sqrt(20000) = 141.4 -> 1 (the area decides, not the long side)
        [224.0, 224.0],  # 4 x 56 -> 2
        [447.0, 447.0],  # -> 2
        [448.0, 448.0],  # 8 x 56 -> 3
        [1000.0, 1000.0],  # log2(17.9) = 4.2 -> clamped to 3
    ])  # fmt: skip
    rois = torch.cat([torch.zeros(len(sides), 3), sides, torch.full((len(sides), 1), 0.7)], dim=1)
    assert extractor.map_levels(rois).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert MultiScaleRotatedRoIAlign((8, 16), finest_scale=28).map_levels(rois).tolist() == [0] + [1] * 8


def test_multiscale_pools_each_roi_from_its_level():
    g = torch.Generator().manual_seed(3)
    strides = (4, 8, 16, 32)
    features = [torch.randn(2, 6, 256 // s, 192 // s, generator=g, requires_grad=True) for s in strides]
    extra = torch.randn(2, 6, 4, 3, generator=g)  # a fifth (P6) map, ignored as mmdet's RoI head slices it off
    sizes = torch.tensor([[30.0, 20.0], [150.0, 120.0], [300.0, 200.0], [600.0, 400.0], [2000.0, 1000.0], [8.0, 6.0]])
    centres = torch.rand(len(sizes), 2, generator=g) * torch.tensor([192.0, 256.0])
    rois = torch.cat([torch.tensor([[0.0], [1.0], [0.0], [1.0], [1.0], [0.0]]), centres, sizes,
                      torch.rand(len(sizes), 1, generator=g) - 0.5], dim=1)  # fmt: skip
    extractor = MultiScaleRotatedRoIAlign(strides)
    levels = extractor.map_levels(rois)
    assert levels.tolist() == [0, 1, 2, 3, 3, 0]
    out = extractor(features + [extra], rois)
    assert out.shape == (6, 6, 7, 7)
    for i, level in enumerate(levels.tolist()):
        expected = reference(features[level].detach(), rois[i : i + 1], spatial_scale=1 / strides[level])
        torch.testing.assert_close(out[i : i + 1].double(), expected, rtol=0, atol=1e-5)
    out.sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)
    named = extractor({str(i): f for i, f in enumerate(features)}, rois)
    torch.testing.assert_close(named, out)
    assert extractor(features, torch.zeros(0, 6)).shape == (0, 6, 7, 7)
    with pytest.raises(ValueError, match="at least 4 feature maps"):
        extractor(features[:3], rois)


def test_batched_over_rois_no_python_loop_per_roi(monkeypatch):
    """All RoIs of one image go through one grid_sample call (one per image and level)."""
    calls = []
    original = torch.nn.functional.grid_sample

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grid_sample", counting)
    features = torch.randn(2, 3, 32, 32)
    rois = torch.cat([torch.randint(2, (50, 1)).float(), torch.rand(50, 2) * 32, 4 + torch.rand(50, 2) * 8,
                      torch.rand(50, 1)], dim=1)  # fmt: skip
    assert roi_align_rotated(features, rois).shape == (50, 3, 7, 7)
    assert len(calls) == 2 and sum(shape[1] for shape in calls) == 50 * 49  # one row per bin, its 2 x 2 points
    np.testing.assert_array_equal([shape[2] for shape in calls], [4, 4])


def test_channels_split_over_threads_give_the_same_result():
    """On CPU the channels are cut into as many images as there are threads (torch's kernel threads over images)."""
    g = torch.Generator().manual_seed(4)
    features = torch.randn(2, 6, 12, 14, generator=g, dtype=torch.float64, requires_grad=True)
    rois = random_rois(10, g, batch=2, height=12, width=14, scale=1.0, margin=-1.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # 6 channels -> 3 images of 2
        got = roi_align_rotated(features, rois)
        (grad,) = torch.autograd.grad(got.sum(), features)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got.detach(), reference(features.detach(), rois), rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, torch.autograd.grad(roi_align_rotated(features, rois).sum(), features)[0])
