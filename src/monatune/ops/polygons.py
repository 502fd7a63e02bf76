"""Exact polygon areas, IoU and IoF for DOTA's 8-point polygons, in plain torch.

The DOTA devkit scores detections with ``polyiou`` (C++) and mmrotate's image-split tool keeps objects by
shapely's intersection-over-foreground; neither shapely nor cv2 is a monatune dependency and torchvision's
polygon support stops at rectangles. So the intersection of a subject polygon with a *convex* polygon is
computed here by Sutherland-Hodgman clipping, vectorised over all pairs at once, and areas by the shoelace
formula. Clipping a simple non-convex subject (a DOTA annotation can be one) by a convex region can leave
zero-width bridges in the output, which add no area, so the area is still exact. Either vertex orientation
is accepted; polygons of zero area get IoU and IoF 0.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .boxes import _check_2d

__all__ = ["polygon_area", "polygon_iof", "polygon_iou"]

_CHUNK = 1 << 16  # polygon pairs clipped in one go (each takes a few hundred bytes per stage)


def polygon_area(polygons: Tensor) -> Tensor:
    """Area of each polygon (shoelace formula, either orientation).

    Args:
        polygons: ``[N, 2k]`` ``x1, y1, ..., xk, yk``.

    Returns:
        ``[N]`` areas, in the input's floating dtype (computed in float64).
    """
    polygons = torch.as_tensor(polygons)
    if polygons.ndim != 2 or polygons.shape[1] % 2 or polygons.shape[1] < 6:
        raise ValueError(f"`polygons` must have shape [N, 2k] (x1, y1, ..., xk, yk) with k >= 3, "
                         f"got {list(polygons.shape)}")  # fmt: skip
    dtype = polygons.dtype if polygons.is_floating_point() else torch.float32
    points = polygons.double().reshape(len(polygons), -1, 2)
    return _signed_area(points).abs().to(dtype)


def polygon_iou(polygons: Tensor, convex: Tensor) -> Tensor:
    """Area IoU of every polygon with every convex quadrilateral.

    Args:
        polygons: ``[N, 8]`` simple quadrilaterals (may be non-convex), ``x1, y1, ..., x4, y4``.
        convex: ``[M, 8]`` convex quadrilaterals, e.g. corners of rotated boxes.

    Returns:
        ``[N, M]`` IoU in the inputs' floating dtype (computed in float64); 0 where either polygon has
        zero area.
    """
    polygons = _check_2d(polygons, 8, "polygons", "(x1, y1, ..., x4, y4)")
    convex = _check_2d(convex, 8, "convex", "(x1, y1, ..., x4, y4)").to(polygons.device)
    dtype = torch.promote_types(polygons.dtype, convex.dtype)
    n, m = len(polygons), len(convex)
    subject, clip = polygons.double().reshape(n, 4, 2), convex.double().reshape(m, 4, 2)
    area_s, area_c = _signed_area(subject).abs(), _signed_area(clip).abs()
    inter = torch.zeros(n, m, dtype=torch.float64, device=polygons.device)
    # only pairs whose axis-aligned boxes overlap can intersect
    lo_s, hi_s, lo_c, hi_c = subject.amin(1), subject.amax(1), clip.amin(1), clip.amax(1)
    overlap = ((lo_s[:, None] <= hi_c[None]) & (lo_c[None] <= hi_s[:, None])).all(-1)
    overlap &= (area_s[:, None] > 0) & (area_c[None] > 0)
    rows, cols = overlap.nonzero(as_tuple=True)
    for k in range(0, len(rows), _CHUNK):
        r, c = rows[k:k + _CHUNK], cols[k:k + _CHUNK]
        inter[r, c] = _intersection_area(subject[r], clip[c])
    union = area_s[:, None] + area_c[None] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return iou.to(dtype)


def polygon_iof(polygons: Tensor, window: Sequence[float] | Tensor) -> Tensor:
    """Fraction of each polygon's area inside an axis-aligned window: ``area(poly & window) / area(poly)``.

    Args:
        polygons: ``[N, 8]`` simple quadrilaterals (may be non-convex).
        window: ``(x1, y1, x2, y2)`` with ``x1 <= x2`` and ``y1 <= y2``.

    Returns:
        ``[N]`` in the polygons' floating dtype; 0 for a polygon of zero area.
    """
    polygons = _check_2d(polygons, 8, "polygons", "(x1, y1, ..., x4, y4)")
    window = torch.as_tensor(window, dtype=torch.float64).flatten()
    if window.shape != (4,) or window[2] < window[0] or window[3] < window[1]:
        raise ValueError(f"`window` must be (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2, got {window.tolist()}")
    x1, y1, x2, y2 = window.tolist()
    clip = torch.tensor([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=torch.float64, device=polygons.device)
    subject = polygons.double().reshape(-1, 4, 2)
    area = _signed_area(subject).abs()
    inter = torch.zeros(len(subject), dtype=torch.float64, device=polygons.device)
    for k in range(0, len(subject), _CHUNK):
        part = subject[k:k + _CHUNK]
        inter[k:k + _CHUNK] = _intersection_area(part, clip.expand(len(part), 4, 2))
    return torch.where(area > 0, inter / area.clamp_min(torch.finfo(torch.float64).tiny), 0.0).to(polygons.dtype)


def _signed_area(points: Tensor, valid: Tensor | None = None) -> Tensor:
    """Shoelace area of ``[P, n, 2]`` polygons (positive when counter-clockwise in x-right, y-up axes).

    With ``valid`` (``[P, n]``, the valid vertices first in each row), only those vertices form the polygon.
    """
    nxt = _next_index(points, valid)
    following = points.gather(1, nxt[..., None].expand_as(points))
    cross = points[..., 0] * following[..., 1] - points[..., 1] * following[..., 0]
    if valid is not None:
        cross = torch.where(valid, cross, 0.0)
    return cross.sum(1) / 2


def _next_index(points: Tensor, valid: Tensor | None) -> Tensor:
    """Index of the vertex after each one, cyclically over the valid ones."""
    p, n = points.shape[:2]
    index = torch.arange(n, device=points.device).expand(p, n)
    count = torch.full((p, 1), n, device=points.device) if valid is None else valid.sum(1, keepdim=True)
    return torch.where(index + 1 < count, index + 1, 0)


def _intersection_area(subject: Tensor, clip: Tensor) -> Tensor:
    """Area of ``subject [P, n, 2] & clip [P, k, 2]`` (convex clip, any orientation), by Sutherland-Hodgman.

    The clipped polygon of each pair is kept as its first ``count`` rows (the rest padding), so the vertex
    before row ``i`` is row ``i - 1``, and row ``count - 1`` for row 0.
    """
    p = len(subject)
    if p == 0:
        return subject.new_zeros(0)
    orientation = torch.sign(_signed_area(clip))  # makes "inside" the left of each clip edge for either order
    points = subject
    count = torch.full((p, 1), subject.shape[1], device=subject.device)
    for k in range(clip.shape[1]):
        a, b = clip[:, None, k], clip[:, None, (k + 1) % clip.shape[1]]  # P, 1, 2
        edge = (b - a) * orientation[:, None, None]
        side = edge[..., 0] * (points[..., 1] - a[..., 1]) - edge[..., 1] * (points[..., 0] - a[..., 0])  # P, n
        valid = torch.arange(points.shape[1], device=points.device) < count
        inside = (side >= 0) & valid
        last = (count - 1).clamp_min(0)
        start = torch.cat([points.gather(1, last[..., None].expand(p, 1, 2)), points[:, :-1]], dim=1)
        start_side = torch.cat([side.gather(1, last), side[:, :-1]], dim=1)
        start_inside = torch.cat([inside.gather(1, last), inside[:, :-1]], dim=1)
        crossing = (start_inside != inside) & valid
        t = start_side / torch.where(crossing, start_side - side, 1.0)
        cut = start + t[..., None] * (points - start)
        # per edge (start -> vertex): the crossing point if the edge crosses, then the vertex if inside
        candidates = torch.stack([cut, points], dim=2).reshape(p, -1, 2)
        keep = torch.stack([crossing, inside], dim=2).reshape(p, -1)
        position = keep.cumsum(1) - 1
        count = position[:, -1:] + 1
        width = max(int(count.max()), 1)
        slot = torch.where(keep, position, width)  # dropped candidates all go to one spare slot
        points = candidates.new_zeros(p, width + 1, 2).scatter_(1, slot[..., None].expand(-1, -1, 2), candidates)
        points = points[:, :width]
    valid = torch.arange(points.shape[1], device=points.device) < count
    area = _signed_area(points, valid.expand(p, -1)).abs()
    return torch.where((count[:, 0] >= 3) & (orientation != 0), area, 0.0)  # a flat clip region holds no area
