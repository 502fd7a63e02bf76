"""Rotated-box conventions: mmrotate's le90 and torchvision's CXCYWHR, polygons, minimum-area rectangles.

A **le90** box is ``(cx, cy, w, h, theta)`` with ``theta`` in radians and the w-axis ``(cos theta, sin theta)``
in image coordinates (y down), so ``theta > 0`` turns clockwise on screen; ground truth is normalised to
``w >= h`` and ``theta in [-pi/2, pi/2)`` (mmrotate's ``poly2obb_np_le90``). torchvision's ``CXCYWHR`` has the
angle in degrees, counter-clockwise on screen: ``r = -theta * 180 / pi``.

torchvision's ``box_convert(..., "xyxyxyxy", "cxcywhr")`` takes the first polygon edge as ``w`` (it is not a
minimum-area rectangle) and mmrotate's ``poly2obb_np`` calls ``cv2.minAreaRect``; neither cv2 nor shapely is
a monatune dependency, so :func:`polygons_to_le90` finds the rectangle itself: the minimum-area rectangle
has a side along an edge of the convex hull (rotating calipers), and every hull edge of four points joins
two of them, so trying the six directions between point pairs finds it, for all polygons at once.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

__all__ = [
    "cxcywhr_to_le90",
    "le90_to_cxcywhr",
    "le90_to_hbb",
    "le90_to_polygons",
    "norm_le90",
    "polygons_to_le90",
    "rotated_box_iou",
]  # fmt: skip

_PAIRS = ((0, 1), (1, 2), (2, 3), (3, 0), (0, 2), (1, 3))  # the directions rotating calipers can end on


def norm_le90(theta: Tensor) -> Tensor:
    """Wrap angles (radians) into ``[-pi/2, pi/2)``: ``((theta + pi/2) mod pi) - pi/2``.

    Rounding can make the modulo return ``pi`` itself (for ``theta`` just below ``-pi/2``); such values are
    moved to ``-pi/2``, so the result is always below ``pi/2`` as represented in ``theta``'s dtype.

    Args:
        theta: Angles in radians, any shape.
    """
    theta = torch.as_tensor(theta)
    wrapped = torch.remainder(theta + math.pi / 2, math.pi) - math.pi / 2
    return torch.where(wrapped >= math.pi / 2, wrapped - math.pi, wrapped)


def le90_to_cxcywhr(boxes: Tensor) -> Tensor:
    """le90 ``(cx, cy, w, h, theta)`` to torchvision ``CXCYWHR`` (degrees, counter-clockwise on screen).

    Args:
        boxes: ``[..., 5]`` le90 boxes.
    """
    boxes = _check_last(boxes, 5, "boxes", "(cx, cy, w, h, theta)")
    return torch.cat([boxes[..., :4], boxes[..., 4:] * (-180.0 / math.pi)], dim=-1)


def cxcywhr_to_le90(boxes: Tensor) -> Tensor:
    """torchvision ``CXCYWHR`` to le90 normalised as ground truth: ``w >= h``, ``theta in [-pi/2, pi/2)``.

    Where ``w < h`` the sides are swapped and ``pi/2`` added to the angle before it is wrapped.

    Args:
        boxes: ``[..., 5]`` ``(cx, cy, w, h, r)`` with ``r`` in degrees, counter-clockwise on screen.
    """
    boxes = _check_last(boxes, 5, "boxes", "(cx, cy, w, h, r)")
    w, h = boxes[..., 2], boxes[..., 3]
    theta = boxes[..., 4] * (-math.pi / 180.0)
    swap = w < h
    theta = norm_le90(torch.where(swap, theta + math.pi / 2, theta))
    return torch.stack([boxes[..., 0], boxes[..., 1], torch.maximum(w, h), torch.minimum(w, h), theta], dim=-1)


def le90_to_polygons(boxes: Tensor) -> Tensor:
    """Corners of le90 boxes, ``[N, 8]`` = ``p1 .. p4`` as ``x, y`` pairs.

    ``p1 = c - (w/2)u - (h/2)v``, ``p2 = c + (w/2)u - (h/2)v``, ``p3 = c + (w/2)u + (h/2)v``,
    ``p4 = c - (w/2)u + (h/2)v`` with ``u = (cos theta, sin theta)``, ``v = (-sin theta, cos theta)``
    (mmrotate's ``obb2poly_le90``): clockwise on screen for ``w, h > 0``.

    Args:
        boxes: ``[N, 5]`` le90 boxes.
    """
    boxes = _check_2d(boxes, 5, "boxes", "(cx, cy, w, h, theta)")
    centre, w, h, theta = boxes[:, :2], boxes[:, 2:3], boxes[:, 3:4], boxes[:, 4:5]
    cos, sin = torch.cos(theta), torch.sin(theta)
    half_u = torch.cat([cos, sin], dim=1) * (w / 2)
    half_v = torch.cat([-sin, cos], dim=1) * (h / 2)
    corners = [centre - half_u - half_v, centre + half_u - half_v, centre + half_u + half_v, centre - half_u + half_v]
    return torch.cat(corners, dim=1)


def le90_to_hbb(boxes: Tensor) -> Tensor:
    """The circumscribed axis-aligned box of each le90 box, as a le90 box (mmrotate's ``obb2hbb_le90``).

    ``(cx, cy, W, H, 0)`` where the axis-aligned extents satisfy ``W >= H``, else ``(cx, cy, H, W, -pi/2)``.

    Args:
        boxes: ``[N, 5]`` le90 boxes.
    """
    boxes = _check_2d(boxes, 5, "boxes", "(cx, cy, w, h, theta)")
    extent_x, extent_y = _extents(boxes)
    wide = extent_x >= extent_y
    return torch.stack([
        boxes[:, 0], boxes[:, 1], torch.where(wide, extent_x, extent_y), torch.where(wide, extent_y, extent_x),
        torch.where(wide, 0.0, -math.pi / 2).to(boxes.dtype),
    ], dim=1)  # fmt: skip


def rotated_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Rotated-rectangle IoU of le90 boxes, ``[N, M]`` float32, by torchvision's ``box_iou(fmt="cxcywhr")``.

    No autograd (torchvision's rotated kernel has none). Boxes of zero area have IoU 0 with everything.

    Caveat: the kernel (adapted from detectron2's, as is mmcv's ``box_iou_rotated`` that mmrotate uses) can
    be far off when an edge of one box nearly coincides with an edge of the other at an angle that is not a
    multiple of 90 degrees: e.g. a box against itself turned by 1e-6 degrees gives 0.6, and boxes slid along
    a shared edge line can be off by 0.3. Generic pairs agree with exact clipping to about 1e-6. Where that
    matters, ``polygon_iou(le90_to_polygons(a.double()), le90_to_polygons(b.double()))`` is exact (float64
    Sutherland-Hodgman) and about 20 times slower.

    Args:
        boxes1: ``[N, 5]`` le90 boxes.
        boxes2: ``[M, 5]`` le90 boxes.
    """
    boxes1 = _check_2d(boxes1, 5, "boxes1", "(cx, cy, w, h, theta)")
    boxes2 = _check_2d(boxes2, 5, "boxes2", "(cx, cy, w, h, theta)")
    if len(boxes1) == 0 or len(boxes2) == 0:
        return boxes1.new_zeros((len(boxes1), len(boxes2)), dtype=torch.float32)
    iou = box_iou(le90_to_cxcywhr(boxes1.float()), le90_to_cxcywhr(boxes2.float()).to(boxes1.device), fmt="cxcywhr")
    return iou.float()


def polygons_to_le90(polygons: Tensor | np.ndarray) -> Tensor:
    """Minimum-area enclosing rectangle of each 4-point polygon, as le90 ground truth (``w >= h``).

    The result matches mmrotate's ``poly2obb_np_le90`` (``cv2.minAreaRect``, then ``w >= h`` and ``theta`` in
    ``[-pi/2, pi/2)``) up to float precision; boxes are not filtered (mmrotate drops sides under 2 px, the
    caller decides). Vertex order and orientation do not matter; the polygon need not be convex. For a square
    the angle is one of the two equivalent ones. Computed in float64, returned as float32 on the input's
    device (CPU for an array).

    Args:
        polygons: ``[N, 8]`` ``x1, y1, ..., x4, y4``.
    """
    polygons = torch.as_tensor(polygons)
    polygons = _check_2d(polygons, 8, "polygons", "(x1, y1, x2, y2, x3, y3, x4, y4)")
    points = polygons.double().reshape(-1, 4, 2)  # N, 4, 2
    if len(points) == 0:
        return torch.zeros((0, 5), dtype=torch.float32, device=polygons.device)
    first, second = torch.tensor(_PAIRS, device=points.device).unbind(1)
    direction = points[:, second] - points[:, first]  # N, 6, 2
    length = direction.norm(dim=-1, keepdim=True)
    u = direction / length.clamp_min(torch.finfo(torch.float64).tiny)
    v = torch.stack([-u[..., 1], u[..., 0]], dim=-1)
    along_u = torch.einsum("npk,nck->ncp", points, u)  # N, 6, 4: coordinate of each point along each direction
    along_v = torch.einsum("npk,nck->ncp", points, v)
    lo_u, hi_u = along_u.amin(-1), along_u.amax(-1)
    lo_v, hi_v = along_v.amin(-1), along_v.amax(-1)
    area = (hi_u - lo_u) * (hi_v - lo_v)
    area = torch.where(length[..., 0] > 0, area, torch.inf)  # a repeated point gives no direction
    best = area.argmin(dim=1, keepdim=True)  # N, 1; all inf (every point the same): the first, u undefined

    def pick(t: Tensor) -> Tensor:
        return t.gather(1, best)[:, 0]

    size_u, size_v = pick(hi_u - lo_u), pick(hi_v - lo_v)
    mid_u, mid_v = pick(lo_u + hi_u) / 2, pick(lo_v + hi_v) / 2
    ux, uy = pick(u[..., 0]), pick(u[..., 1])
    degenerate = ~torch.isfinite(pick(area))
    ux, uy = torch.where(degenerate, 1.0, ux), torch.where(degenerate, 0.0, uy)
    size_u, size_v = torch.where(degenerate, 0.0, size_u), torch.where(degenerate, 0.0, size_v)
    mid_u = torch.where(degenerate, points[:, 0, 0], mid_u)
    mid_v = torch.where(degenerate, points[:, 0, 1], mid_v)
    cx, cy = mid_u * ux - mid_v * uy, mid_u * uy + mid_v * ux  # back from (u, v) coordinates
    theta = torch.atan2(uy, ux)
    long_u = size_u >= size_v
    theta = norm_le90(torch.where(long_u, theta, theta + math.pi / 2)).float()
    theta = torch.where(theta >= math.pi / 2, theta - math.pi, theta)  # float64 just under pi/2 rounds up to it
    w, h = torch.maximum(size_u, size_v), torch.minimum(size_u, size_v)
    return torch.stack([cx.float(), cy.float(), w.float(), h.float(), theta], dim=1)


def _extents(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Axis-aligned width and height of le90 boxes."""
    w, h, theta = boxes[:, 2], boxes[:, 3], boxes[:, 4]
    cos, sin = torch.cos(theta).abs(), torch.sin(theta).abs()
    return w * cos + h * sin, w * sin + h * cos


def _check_last(t: Tensor, size: int, name: str, layout: str) -> Tensor:
    t = torch.as_tensor(t)
    if t.shape[-1:] != (size,):
        raise ValueError(f"`{name}` must have shape [..., {size}] {layout}, got {list(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    return t


def _check_2d(t: Tensor, size: int, name: str, layout: str) -> Tensor:
    t = torch.as_tensor(t)
    if t.numel() == 0 and t.ndim <= 2:
        return t.reshape(0, size).float() if not t.is_floating_point() else t.reshape(0, size)
    if t.ndim != 2 or t.shape[1] != size:
        raise ValueError(f"`{name}` must have shape [N, {size}] {layout}, got {list(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    return t
