"""Rotated RoIAlign (mmcv's ``RoIAlignRotated``) in plain PyTorch, and mmrotate's multi-level RoI extractor.

torchvision has ``roi_align`` for axis-aligned boxes only. Here every bin of every RoI is sampled on the RoI's
rotated grid with :func:`torch.nn.functional.grid_sample`, all RoIs of an image in one call, then averaged;
autograd gives the gradient with respect to the features (the transposed bilinear weights, as mmcv's backward).

mmcv's kernel (``roi_align_rotated`` CPU / CUDA, mmcv 1.x as the release uses), per RoI
``(batch, cx, cy, w, h, theta)``:

1. ``cx, cy, w, h`` are multiplied by ``spatial_scale``; ``aligned`` subtracts 0.5 from the centre (pixel
   ``i`` covers ``[i, i + 1)``, its value sits at ``i + 0.5``); without ``aligned``, ``w`` and ``h`` are at least 1.
2. Bin ``(ph, pw)`` takes ``sampling_ratio`` x ``sampling_ratio`` points at
   ``yy = -h/2 + ph h/H_out + (iy + 0.5) (h/H_out) / sampling_ratio`` (``xx`` likewise), i.e. in the RoI's frame.
3. With ``clockwise`` (as mmrotate calls it, for its le90 boxes) a point goes to
   ``x = cx + xx cos(theta) - yy sin(theta)``, ``y = cy + xx sin(theta) + yy cos(theta)`` (the w-axis along
   ``(cos theta, sin theta)``, y down); without it ``theta`` is negated first.
4. ``bilinear_interpolate``: a point with ``y < -1`` or ``y > H`` (``x`` likewise with ``W``) gives 0; otherwise
   the coordinates are clamped to ``[0, H - 1] x [0, W - 1]`` and interpolated, so in the one-pixel band outside
   the map the edge value is taken whole.
5. The bin is the mean of its points.

``grid_sample``'s own padding does not do step 4 (``zeros`` fades to 0 over the outer half pixel, ``border``
never reaches 0), so the coordinates are clamped here before sampling and the points mmcv drops are sent far
outside the map; the result then equals mmcv's at the border too, up to float rounding of the coordinates
(about 1e-6 of the feature values in float32). ``sampling_ratio <= 0`` (mmcv's adaptive ``ceil(h / H_out)``
points per bin) is supported by grouping RoIs with the same count. Half-precision features are sampled in
float32 and the result cast back (mmrotate's extractor runs under ``force_fp32`` likewise). torch's CPU
``grid_sample`` (forward and backward) spreads only the batch over threads, so on CPU the channels of an image
are cut into ``gcd(C, threads)`` images that share one grid (the same numbers, computed in parallel).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiScaleRotatedRoIAlign", "roi_align_rotated"]

_OUTSIDE = -4.0  # pixel coordinate for dropped points: every bilinear neighbour is outside the map


def roi_align_rotated(
    input: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int] = (7, 7),
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = True,
    clockwise: bool = True,
) -> Tensor:
    """Pool rotated RoIs to ``output_size`` grids, as mmcv ``RoIAlignRotated`` (see the module docstring).

    The gradient flows to ``input`` only (the RoIs are treated as constants, as in mmcv).

    Args:
        input: ``[B, C, H, W]`` features.
        rois: ``[K, 6]`` ``(batch_index, cx, cy, w, h, theta)`` in input-image pixels, ``theta`` in radians as
            mmrotate's le90 boxes carry it.
        output_size: ``(H_out, W_out)`` bins (or one int for both).
        spatial_scale: Feature-map size over image size (``1 / stride``).
        sampling_ratio: Points per bin along each axis; ``<= 0``: ``ceil`` of the bin size, per RoI.
        aligned: Subtract half a pixel from the scaled centre (mmcv's ``aligned=True``).
        clockwise: ``theta`` turns the box clockwise on screen (mmrotate's le90); ``False`` negates it.

    Returns:
        ``[K, C, H_out, W_out]`` in ``input``'s dtype.

    Example:
        >>> features = torch.arange(64.0).reshape(1, 1, 8, 8)  # value = 8 y + x at pixel (x, y)
        >>> rois = torch.tensor([[0.0, 4.0, 4.0, 4.0, 4.0, 0.0]])  # the central 4 x 4 pixels, 2 x 2 bins of 2 x 2
        >>> # bin (0, 0) samples pixels x, y in {2, 3}: 8 * 2.5 + 2.5
        >>> roi_align_rotated(features, rois, output_size=2)[0, 0]
        tensor([[22.5000, 24.5000],
                [38.5000, 40.5000]])
    """
    out_h, out_w = _pair(output_size, "output_size")
    if input.ndim != 4:
        raise ValueError(f"`input` must have shape [B, C, H, W], got {list(input.shape)}")
    if rois.ndim != 2 or rois.shape[1] != 6:
        raise ValueError(f"`rois` must have shape [K, 6] (batch_index, cx, cy, w, h, theta), got {list(rois.shape)}")
    if not spatial_scale > 0:
        raise ValueError(f"`spatial_scale` must be positive, got {spatial_scale}")
    batch, channels, height, width = input.shape
    dtype = input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32
    output = input.new_zeros((len(rois), channels, out_h, out_w), dtype=dtype)
    if len(rois) == 0:
        return output.to(input.dtype)
    rois = rois.detach().to(device=input.device, dtype=dtype)
    image = rois[:, 0].round().long()
    if image.min() < 0 or image.max() >= batch:
        raise ValueError(f"`rois[:, 0]` must be batch indices in [0, {batch}), got values {image.unique().tolist()}")

    cx = rois[:, 1] * spatial_scale - (0.5 if aligned else 0.0)
    cy = rois[:, 2] * spatial_scale - (0.5 if aligned else 0.0)
    roi_w, roi_h = rois[:, 3] * spatial_scale, rois[:, 4] * spatial_scale
    if not aligned:  # mmcv: "for backward-compatibility only"
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    theta = -rois[:, 5] if clockwise else rois[:, 5]  # mmcv negates for clockwise, then turns counter-clockwise
    frame = (cx, cy, roi_w, roi_h, torch.cos(theta), torch.sin(theta))

    if sampling_ratio > 0:
        groups = [(torch.arange(len(rois), device=rois.device), sampling_ratio, sampling_ratio)]
    else:  # mmcv: ceilf(roi_height / pooled_height) points (float32 division) per RoI
        grid_h = torch.ceil((roi_h.float() / out_h)).long()
        grid_w = torch.ceil((roi_w.float() / out_w)).long()
        pairs, which = torch.unique(torch.stack([grid_h, grid_w], dim=1), dim=0, return_inverse=True)
        groups = [(torch.nonzero(which == i)[:, 0], int(gh), int(gw)) for i, (gh, gw) in enumerate(pairs.tolist())]

    split = math.gcd(channels, torch.get_num_threads()) if input.device.type == "cpu" else 1
    for index, grid_h, grid_w in groups:
        if grid_h == 0 or grid_w == 0:  # an empty RoI: no points, mmcv's value is 0
            continue
        x, y = _sample_points([t[index] for t in frame], out_h, out_w, grid_h, grid_w)  # k, bins, points per bin
        dropped = (y < -1.0) | (y > height) | (x < -1.0) | (x > width)
        x = torch.where(dropped, _OUTSIDE, x.clamp(0, width - 1))
        y = torch.where(dropped, _OUTSIDE, y.clamp(0, height - 1))
        grid = torch.stack([(2 * x + 1) / width - 1, (2 * y + 1) / height - 1], dim=-1)  # align_corners=False
        for b in image[index].unique().tolist():
            chosen = image[index] == b
            rows = grid[chosen]  # k_b, bins, points, 2
            k = len(rows)
            # the channels as `split` images sharing one grid: torch's CPU kernel spreads only images over threads
            sampled = F.grid_sample(
                input[b].to(dtype).reshape(split, channels // split, height, width),
                rows.reshape(1, k * out_h * out_w, grid_h * grid_w, 2).expand(split, -1, -1, -1),
                mode="bilinear", padding_mode="zeros", align_corners=False,
            )  # fmt: skip  # split, C / split, k_b bins, points: a bin's points are adjacent, so the mean is contiguous
            output[index[chosen]] = sampled.mean(dim=-1).view(channels, k, out_h, out_w).transpose(0, 1)
    return output.to(input.dtype)


def _sample_points(frame: list[Tensor], out_h: int, out_w: int, grid_h: int, grid_w: int) -> tuple[Tensor, Tensor]:
    """Feature-map ``(x, y)`` of every sampling point, ``[k, out_h * out_w, grid_h * grid_w]`` each, bin-major
    (mmcv's order of operations: ``start + p * bin + (i + 0.5) * bin / grid``)."""
    cx, cy, roi_w, roi_h, cos, sin = frame
    k = len(cx)
    yy = _axis(roi_h, out_h, grid_h)[:, :, None, :, None]  # k, out_h, 1, grid_h, 1
    xx = _axis(roi_w, out_w, grid_w)[:, None, :, None, :]  # k, 1, out_w, 1, grid_w
    cos, sin = cos.view(k, 1, 1, 1, 1), sin.view(k, 1, 1, 1, 1)
    y = yy * cos - xx * sin + cy.view(k, 1, 1, 1, 1)
    x = yy * sin + xx * cos + cx.view(k, 1, 1, 1, 1)
    shape = (k, out_h * out_w, grid_h * grid_w)
    return x.reshape(shape), y.reshape(shape)


def _axis(size: Tensor, bins: int, grid: int) -> Tensor:
    """Offsets from the RoI centre along one side, ``[k, bins, grid]``."""
    bin_size = (size / bins)[:, None, None]
    p = torch.arange(bins, device=size.device, dtype=size.dtype)[None, :, None]
    i = torch.arange(grid, device=size.device, dtype=size.dtype)[None, None, :] + 0.5
    return -size[:, None, None] / 2.0 + p * bin_size + i * bin_size / grid


class MultiScaleRotatedRoIAlign(nn.Module):
    """mmrotate ``RotatedSingleRoIExtractor`` with ``RoIAlignRotated(7, sampling_ratio=2, clockwise=True)``.

    Each RoI is pooled from one pyramid level: ``floor(log2(sqrt(w h) / finest_scale + 1e-6))`` clamped to the
    levels (with 56 and strides 4-32: ``sqrt(w h) < 112`` on stride 4, ``< 224`` on 8, ``< 448`` on 16, the rest
    on 32), with ``spatial_scale = 1 / stride`` and mmcv's ``aligned=True``.

    Args:
        featmap_strides: Stride of each level the RoIs are pooled from.
        output_size: Bins per side.
        sampling_ratio: Points per bin along each axis (see :func:`roi_align_rotated`).
        finest_scale: RoIs with ``sqrt(w h)`` under twice this go to the first level.

    Example:
        >>> extractor = MultiScaleRotatedRoIAlign()
        >>> features = [torch.randn(1, 8, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
        >>> rois = torch.tensor([[0.0, 30.0, 30.0, 40.0, 20.0, 0.5], [0.0, 32.0, 32.0, 300.0, 100.0, -1.0]])
        >>> extractor(features, rois).shape, extractor.map_levels(rois).tolist()
        (torch.Size([2, 8, 7, 7]), [0, 1])
    """

    def __init__(
        self,
        featmap_strides: Sequence[int] = (4, 8, 16, 32),
        output_size: int = 7,
        sampling_ratio: int = 2,
        finest_scale: int = 56,
    ) -> None:
        super().__init__()
        self.featmap_strides = tuple(int(s) for s in featmap_strides)
        if not self.featmap_strides or min(self.featmap_strides) <= 0:
            raise ValueError(f"`featmap_strides` must be positive ints, got {featmap_strides}")
        self.output_size = _pair(output_size, "output_size")
        self.sampling_ratio = int(sampling_ratio)
        if not finest_scale > 0:
            raise ValueError(f"`finest_scale` must be positive, got {finest_scale}")
        self.finest_scale = finest_scale

    def extra_repr(self) -> str:
        return (
            f"featmap_strides={self.featmap_strides}, output_size={self.output_size}, "
            f"sampling_ratio={self.sampling_ratio}, finest_scale={self.finest_scale}"
        )

    def map_levels(self, rois: Tensor) -> Tensor:
        """Level index ``[K]`` (int64) of each ``[K, 6]`` RoI (mmrotate ``map_roi_levels``)."""
        scale = torch.sqrt(rois[:, 3] * rois[:, 4])
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return levels.clamp(min=0, max=len(self.featmap_strides) - 1).long()

    def forward(self, features: Sequence[Tensor] | Mapping[str, Tensor], rois: Tensor) -> Tensor:
        """Pool ``rois`` ``[K, 6]`` (image pixels) from ``features`` (one ``[B, C, H_l, W_l]`` map per stride).

        Maps beyond ``len(featmap_strides)`` are ignored (mmdet's RoI head passes ``x[:num_inputs]``; Oriented
        R-CNN's FPN has a fifth, max-pooled level that only the RPN uses). A mapping is taken in its order.

        Returns:
            ``[K, C, H_out, W_out]`` in the features' dtype.
        """
        maps = list(features.values()) if isinstance(features, Mapping) else list(features)
        if len(maps) < len(self.featmap_strides):
            raise ValueError(
                f"expected at least {len(self.featmap_strides)} feature maps for strides {self.featmap_strides}, "
                f"got {len(maps)}"
            )
        maps = maps[: len(self.featmap_strides)]
        if rois.ndim != 2 or rois.shape[1] != 6:
            raise ValueError(f"`rois` must have shape [K, 6] (batch_index, cx, cy, w, h, theta), got {rois.shape}")
        options = dict(output_size=self.output_size, sampling_ratio=self.sampling_ratio, aligned=True, clockwise=True)
        out = maps[0].new_zeros((len(rois), maps[0].shape[1], *self.output_size))
        if len(rois) == 0:
            return out
        levels = self.map_levels(rois)
        for level, (feature, stride) in enumerate(zip(maps, self.featmap_strides)):
            index = torch.nonzero(levels == level)[:, 0]
            if len(index):
                out[index] = roi_align_rotated(feature, rois[index], spatial_scale=1.0 / stride, **options)
        return out


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"`{name}` must be a positive int or a pair of them, got {size!r}")
    return pair
