"""Box coders of mmrotate's supervised rotated detectors, and the ``oc`` <-> ``le90`` angle conventions.

- :class:`DeltaXYWHACoder`: mmrotate ``DeltaXYWHAOBBoxCoder`` (rotated RetinaNet's anchors, Oriented R-CNN's
  RoI head): ``(dx, dy, dw, dh, da)`` of a rotated box against a rotated proposal, with the options the
  release's configs use (``edge_swap``, ``proj_xy``, angle version).
- :class:`MidpointOffsetCoder`: mmrotate ``MidpointOffsetCoder`` (Oriented R-CNN's RPN): a rotated box against
  an axis-aligned anchor as ``(dx, dy, dw, dh, da, db)`` of its circumscribed box plus the offsets of two
  vertices along its top and right sides.
- :func:`norm_angle`, :func:`le90_to_oc`, :func:`oc_to_le90`: mmrotate's angle versions.

Angle versions (mmrotate ``angle_range``): a box ``(cx, cy, w, h, a)`` always has its w-side along
``(cos a, sin a)`` in image coordinates (y down, so ``a > 0`` turns clockwise on screen); the versions differ
only in which of the equivalent descriptions is kept:

- ``le90``: ``w >= h``, ``a in [-pi/2, pi/2)`` (``poly2obb_np_le90``);
- ``oc``: ``a in (0, pi/2]``, ``w`` and ``h`` in whatever order that angle gives (``poly2obb_np_oc``, i.e.
  OpenCV's ``minAreaRect``); an axis-aligned box has ``a = pi/2`` and ``w`` its vertical extent;
- ``le135``: ``w >= h``, ``a in [-pi/4, 3pi/4)``.

torchvision's ``BoxCoder`` codes axis-aligned boxes only; the rotated coders are written here, following the
release's formulas step by step (float32 in, float32 out; other floating dtypes are kept).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from monatune.ops import norm_le90

__all__ = ["ANGLE_VERSIONS", "DeltaXYWHACoder", "MidpointOffsetCoder", "le90_to_oc", "norm_angle", "oc_to_le90"]

ANGLE_VERSIONS = ("oc", "le90", "le135")


def norm_angle(angle: Tensor, version: str) -> Tensor:
    """mmrotate ``norm_angle``: wrap angles (radians) into the range of an angle version.

    ``oc`` returns the angles unchanged (as mmrotate does: its coders leave ``oc`` angles unwrapped); ``le90``
    wraps into ``[-pi/2, pi/2)`` and ``le135`` into ``[-pi/4, 3pi/4)`` by ``((a + lo) mod pi) - lo``. Where float
    rounding lands exactly on the open end of the range (``a`` just below the lower end), the value is moved to
    the lower end (the same box); mmrotate would return the upper end there.

    Args:
        angle: Angles in radians, any shape.
        version: ``"oc"``, ``"le90"`` or ``"le135"``.
    """
    _check_version(version)
    if version == "oc":
        return angle
    if version == "le90":
        return norm_le90(angle)
    wrapped = torch.remainder(angle + math.pi / 4, math.pi) - math.pi / 4
    return torch.where(wrapped >= 3 * math.pi / 4, wrapped - math.pi, wrapped)


def le90_to_oc(boxes: Tensor) -> Tensor:
    """The same rectangles as ``oc`` boxes: ``a in (0, pi/2]``, as mmrotate's ``poly2obb_np_oc`` gives them.

    The angle is moved by the multiple of ``pi/2`` that brings it into ``(0, pi/2]``; an odd number of quarter
    turns swaps ``w`` and ``h``. Any ``(cx, cy, w, h, a)`` box is accepted, not only normalised le90 ones.

    Args:
        boxes: ``[N, 5]`` ``(cx, cy, w, h, a)``.
    """
    boxes = _check_boxes(boxes, 5, "boxes", "(cx, cy, w, h, theta)")
    quarter = math.pi / 2
    theta = boxes[:, 4]
    turns = torch.floor((quarter - theta) / quarter)  # a = theta + turns * pi/2 lies in (0, pi/2]
    angle = theta + turns * quarter
    low, high = angle <= 0, angle > quarter  # float rounding at the ends
    angle = torch.where(low, angle + quarter, torch.where(high, angle - quarter, angle))
    turns = turns + low.to(turns.dtype) - high.to(turns.dtype)
    swap = torch.remainder(turns, 2) == 1
    w, h = boxes[:, 2], boxes[:, 3]
    return torch.stack([boxes[:, 0], boxes[:, 1], torch.where(swap, h, w), torch.where(swap, w, h), angle], dim=1)


def oc_to_le90(boxes: Tensor) -> Tensor:
    """The same rectangles as le90 boxes (``w >= h``, ``theta in [-pi/2, pi/2)``, :func:`monatune.ops.norm_le90`).

    Where ``w < h`` the sides are swapped and ``pi/2`` is added to the angle before it is wrapped (mmrotate's
    ``poly2obb_np_le90`` rule, so ``w == h`` keeps the angle).

    Args:
        boxes: ``[N, 5]`` ``(cx, cy, w, h, a)`` (any angle).
    """
    boxes = _check_boxes(boxes, 5, "boxes", "(cx, cy, w, h, a)")
    w, h, angle = boxes[:, 2], boxes[:, 3], boxes[:, 4]
    swap = w < h
    theta = norm_le90(torch.where(swap, angle + math.pi / 2, angle))
    return torch.stack([boxes[:, 0], boxes[:, 1], torch.maximum(w, h), torch.minimum(w, h), theta], dim=1)


class DeltaXYWHACoder:
    """mmrotate ``DeltaXYWHAOBBoxCoder`` (``norm_factor=None``, no centre clamp): rotated box deltas.

    ``encode``: ``dx = (gx - px) / pw``, ``dy = (gy - py) / ph`` (with ``proj_xy``, the offset is first turned into
    the proposal's frame: ``dx = (cos pa (gx - px) + sin pa (gy - py)) / pw``, ``dy = (-sin pa (gx - px) +
    cos pa (gy - py)) / ph``), ``dw = log(gw / pw)``, ``dh = log(gh / ph)``, ``da = norm_angle(ga - pa)``. With
    ``edge_swap`` the target is described either as it is or turned by ``pi/2`` with ``w`` and ``h`` swapped,
    whichever needs the smaller ``|da|`` (``norm_angle(ga - pa)`` against ``norm_angle(ga - pa + pi/2)``).
    Then ``(delta - means) / stds``.

    ``decode`` inverts it: ``dw``, ``dh`` clamped to ``+-|log(wh_ratio_clip)|``, ``ga = norm_angle(pa + da)``, the
    centre clamped to ``[0, W - 1] x [0, H - 1]`` when ``max_shape`` is given; with ``edge_swap`` the result is
    made ``w > h`` (``w <= h`` swaps and adds ``pi/2``, then ``norm_angle``).

    The release's configs: Oriented R-CNN's RoI head ``version="le90", edge_swap=True, proj_xy=True``, stds
    ``(0.1, 0.1, 0.2, 0.2, 0.1)``; rotated RetinaNet ``version="oc"``, means 0, stds 1.

    Args:
        means: Means subtracted from the 5 deltas.
        stds: Standard deviations the deltas are divided by.
        version: Angle version, ``"oc"``, ``"le90"`` or ``"le135"``.
        edge_swap: Describe the target by whichever of its two sides turns least from the proposal's.
        proj_xy: Express the centre offset in the proposal's rotated frame.
        wh_ratio_clip: ``dw`` and ``dh`` are clamped to ``+-|log(wh_ratio_clip)|`` when decoding.

    Example:
        >>> coder = DeltaXYWHACoder(stds=(0.1, 0.1, 0.2, 0.2, 0.1), version="le90", edge_swap=True, proj_xy=True)
        >>> proposals = torch.tensor([[50.0, 50.0, 40.0, 20.0, 0.3]])
        >>> gt = torch.tensor([[52.0, 49.0, 36.0, 24.0, -1.2]])
        >>> torch.allclose(coder.decode(proposals, coder.encode(proposals, gt)), gt, atol=1e-5)
        True
    """

    def __init__(
        self,
        means: Sequence[float] = (0.0,) * 5,
        stds: Sequence[float] = (1.0,) * 5,
        *,
        version: str = "oc",
        edge_swap: bool = False,
        proj_xy: bool = False,
        wh_ratio_clip: float = 16 / 1000,
    ) -> None:
        _check_version(version)
        self.means = _check_floats(means, 5, "means")
        self.stds = _check_floats(stds, 5, "stds")
        if not 0 < wh_ratio_clip:
            raise ValueError(f"`wh_ratio_clip` must be positive, got {wh_ratio_clip}")
        self.version = version
        self.edge_swap = bool(edge_swap)
        self.proj_xy = bool(proj_xy)
        self.wh_ratio_clip = float(wh_ratio_clip)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(means={self.means}, stds={self.stds}, version={self.version!r}, "
            f"edge_swap={self.edge_swap}, proj_xy={self.proj_xy}, wh_ratio_clip={self.wh_ratio_clip})"
        )

    def encode(self, proposals: Tensor, gt: Tensor) -> Tensor:
        """Deltas ``[N, 5]`` that take ``proposals`` ``[N, 5]`` to ``gt`` ``[N, 5]`` (both in :attr:`version`)."""
        proposals = _check_boxes(proposals, 5, "proposals", "(cx, cy, w, h, a)")
        gt = _check_boxes(gt, 5, "gt", "(cx, cy, w, h, a)")
        if len(proposals) != len(gt):
            raise ValueError(f"`proposals` and `gt` must have the same length, got {len(proposals)} and {len(gt)}")
        dtype = torch.promote_types(proposals.dtype, gt.dtype)
        px, py, pw, ph, pa = proposals.to(dtype).unbind(dim=-1)
        gx, gy, gw, gh, ga = gt.to(dtype).unbind(dim=-1)
        if self.proj_xy:
            cos, sin = torch.cos(pa), torch.sin(pa)
            dx = (cos * (gx - px) + sin * (gy - py)) / pw
            dy = (-sin * (gx - px) + cos * (gy - py)) / ph
        else:
            dx, dy = (gx - px) / pw, (gy - py) / ph
        if self.edge_swap:
            turn0 = norm_angle(ga - pa, self.version)
            turn1 = norm_angle(ga - pa + math.pi / 2, self.version)
            keep = turn0.abs() < turn1.abs()
            da = torch.where(keep, turn0, turn1)
            dw = torch.log(torch.where(keep, gw, gh) / pw)
            dh = torch.log(torch.where(keep, gh, gw) / ph)
        else:
            da = norm_angle(ga - pa, self.version)
            dw, dh = torch.log(gw / pw), torch.log(gh / ph)
        deltas = torch.stack([dx, dy, dw, dh, da], dim=-1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(self, proposals: Tensor, deltas: Tensor, max_shape: tuple[int, int] | None = None) -> Tensor:
        """Boxes ``[N, 5 k]`` from ``proposals`` ``[N, 5]`` and deltas ``[N, 5 k]`` (``k`` boxes per proposal).

        Args:
            proposals: ``[N, 5]`` ``(cx, cy, w, h, a)`` in :attr:`version`.
            deltas: ``[N, 5 k]`` as :meth:`encode` gives them (one group of 5 per class for class-wise heads).
            max_shape: ``(H, W)``: clamp the centres to ``[0, W - 1] x [0, H - 1]`` (as mmrotate; sizes untouched).
        """
        proposals = _check_boxes(proposals, 5, "proposals", "(cx, cy, w, h, a)")
        if deltas.ndim != 2 or deltas.shape[1] % 5 or len(deltas) != len(proposals):
            raise ValueError(
                f"`deltas` must have shape [N, 5 k] with N = {len(proposals)} proposals, got {list(deltas.shape)}"
            )
        k = deltas.shape[1] // 5
        deltas = deltas.reshape(len(deltas), k, 5) * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        dx, dy, dw, dh, da = deltas.unbind(dim=-1)  # N, k each
        px, py, pw, ph, pa = (t[:, None].to(deltas.dtype) for t in proposals.unbind(dim=-1))
        max_ratio = abs(math.log(self.wh_ratio_clip))
        gw = pw * dw.clamp(-max_ratio, max_ratio).exp()
        gh = ph * dh.clamp(-max_ratio, max_ratio).exp()
        if self.proj_xy:
            cos, sin = torch.cos(pa), torch.sin(pa)
            gx = dx * pw * cos - dy * ph * sin + px
            gy = dx * pw * sin + dy * ph * cos + py
        else:
            gx, gy = px + pw * dx, py + ph * dy
        ga = norm_angle(pa + da, self.version)
        if max_shape is not None:
            gx = gx.clamp(min=0, max=max_shape[1] - 1)
            gy = gy.clamp(min=0, max=max_shape[0] - 1)
        if self.edge_swap:
            wide = gw > gh
            gw, gh = torch.where(wide, gw, gh), torch.where(wide, gh, gw)
            ga = norm_angle(torch.where(wide, ga, ga + math.pi / 2), self.version)
        return torch.stack([gx, gy, gw, gh, ga], dim=-1).reshape(len(proposals), 5 * k)


class MidpointOffsetCoder:
    """mmrotate ``MidpointOffsetCoder`` (Oriented R-CNN's RPN): rotated targets against axis-aligned anchors.

    ``encode``: ``(dx, dy, dw, dh)`` of the target's circumscribed box against the anchor (mmdet's
    ``DeltaXYWHBBoxCoder`` formulas), ``da = (x_top - gx) / gw`` and ``db = (y_right - gy) / gh``, where ``x_top``
    is the x of the top-most vertex and ``y_right`` the y of the right-most one (among the vertices within 0.1 px
    of the top / right side, the right-most / bottom-most, as the release picks them), ``(gx, gy, gw, gh)`` the
    circumscribed box. Then ``(delta - means) / stds``.

    ``decode``: the circumscribed box from ``(dx, dy, dw, dh)`` (``dw``, ``dh`` clamped to ``+-|log(wh_ratio_clip)|``),
    ``da``, ``db`` clamped to ``[-0.5, 0.5]``; the quadrilateral ``(gx + da gw, y1), (x2, gy + db gh),
    (gx - da gw, y2), (x1, gy - db gh)`` (a parallelogram) has its half-diagonals stretched to the longer one,
    which makes it a rectangle, read as a rotated box by mmrotate's ``poly2obb_{version}`` (first two edges,
    no ``minAreaRect``).

    Args:
        means: Means subtracted from the 6 deltas.
        stds: Standard deviations the deltas are divided by (the release's RPN: ``(1, 1, 1, 1, 0.5, 0.5)``).
        version: Angle version of the targets and of the decoded boxes.

    Example:
        >>> coder = MidpointOffsetCoder()
        >>> anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
        >>> gt = torch.tensor([[18.0, 15.0, 30.0, 12.0, 0.4]])
        >>> torch.allclose(coder.decode(anchors, coder.encode(anchors, gt)), gt, atol=1e-4)
        True
    """

    def __init__(
        self,
        means: Sequence[float] = (0.0,) * 6,
        stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0, 0.5, 0.5),
        *,
        version: str = "le90",
    ) -> None:
        _check_version(version)
        self.means = _check_floats(means, 6, "means")
        self.stds = _check_floats(stds, 6, "stds")
        self.version = version

    def __repr__(self) -> str:
        return f"{type(self).__name__}(means={self.means}, stds={self.stds}, version={self.version!r})"

    def encode(self, anchors_xyxy: Tensor, gt: Tensor) -> Tensor:
        """Deltas ``[N, 6]`` of rotated ``gt`` ``[N, 5]`` (in :attr:`version`) against anchors ``[N, 4]`` ``xyxy``."""
        anchors = _check_boxes(anchors_xyxy, 4, "anchors_xyxy", "(x1, y1, x2, y2)")
        gt = _check_boxes(gt, 5, "gt", "(cx, cy, w, h, a)")
        if len(anchors) != len(gt):
            raise ValueError(f"`anchors_xyxy` and `gt` must have the same length, got {len(anchors)} and {len(gt)}")
        dtype = torch.promote_types(anchors.dtype, gt.dtype)
        anchors, gt = anchors.to(dtype), gt.to(dtype)
        px, py = (anchors[:, 0] + anchors[:, 2]) * 0.5, (anchors[:, 1] + anchors[:, 3]) * 0.5
        pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]

        centre, w, h, theta = gt.split([2, 1, 1, 1], dim=-1)  # mmrotate obb2xyxy: centre -+ half extents
        cos, sin = torch.cos(theta), torch.sin(theta)
        half = torch.cat([(w / 2 * cos).abs() + (h / 2 * sin).abs(), (w / 2 * sin).abs() + (h / 2 * cos).abs()], -1)
        hbb = torch.cat([centre - half, centre + half], dim=-1)
        gx, gy = (hbb[:, 0] + hbb[:, 2]) * 0.5, (hbb[:, 1] + hbb[:, 3]) * 0.5
        gw, gh = hbb[:, 2] - hbb[:, 0], hbb[:, 3] - hbb[:, 1]

        poly = _obb_to_poly(gt)
        xs, ys = poly[:, 0::2], poly[:, 1::2]
        on_top = (ys - ys.amin(dim=1, keepdim=True)).abs() <= 0.1
        on_right = (xs - xs.amax(dim=1, keepdim=True)).abs() <= 0.1
        x_top = torch.where(on_top, xs, -torch.inf).amax(dim=1)
        y_right = torch.where(on_right, ys, -torch.inf).amax(dim=1)

        deltas = torch.stack([
            (gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph),
            (x_top - gx) / gw, (y_right - gy) / gh,
        ], dim=-1)  # fmt: skip
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(
        self,
        anchors_xyxy: Tensor,
        deltas: Tensor,
        max_shape: tuple[int, int] | None = None,
        wh_ratio_clip: float = 16 / 1000,
    ) -> Tensor:
        """Rotated boxes ``[N, 5]`` in :attr:`version` from anchors ``[N, 4]`` ``xyxy`` and deltas ``[N, 6]``.

        Args:
            anchors_xyxy: ``[N, 4]`` axis-aligned anchors or proposals.
            deltas: ``[N, 6]`` as :meth:`encode` gives them.
            max_shape: Accepted for the common signature and ignored, as mmrotate's coder ignores it (proposals
                are not clipped to the image).
            wh_ratio_clip: ``dw`` and ``dh`` are clamped to ``+-|log(wh_ratio_clip)|``.
        """
        del max_shape  # mmrotate's MidpointOffsetCoder.decode does not pass it on
        anchors = _check_boxes(anchors_xyxy, 4, "anchors_xyxy", "(x1, y1, x2, y2)")
        if deltas.ndim != 2 or deltas.shape[1] != 6 or len(deltas) != len(anchors):
            raise ValueError(f"`deltas` must have shape [{len(anchors)}, 6], got {list(deltas.shape)}")
        deltas = deltas * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        dx, dy, dw, dh, da, db = deltas.unbind(dim=-1)
        max_ratio = abs(math.log(wh_ratio_clip))
        dw, dh = dw.clamp(-max_ratio, max_ratio), dh.clamp(-max_ratio, max_ratio)
        anchors = anchors.to(deltas.dtype)
        px, py = (anchors[:, 0] + anchors[:, 2]) * 0.5, (anchors[:, 1] + anchors[:, 3]) * 0.5
        pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
        gw, gh = pw * dw.exp(), ph * dh.exp()
        gx, gy = px + pw * dx, py + ph * dy
        x1, y1, x2, y2 = gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5
        da, db = da.clamp(-0.5, 0.5), db.clamp(-0.5, 0.5)
        polys = torch.stack([gx + da * gw, y1, x2, gy + db * gh, gx - da * gw, y2, x1, gy - db * gh], dim=-1)
        centre = torch.stack([gx, gy], dim=-1).repeat(1, 4)
        offsets = polys - centre
        half_diagonal = torch.sqrt(offsets[:, 0::2] ** 2 + offsets[:, 1::2] ** 2)  # N, 4
        scale = half_diagonal.amax(dim=-1, keepdim=True) / half_diagonal
        rect = offsets * scale.repeat_interleave(2, dim=-1) + centre
        return _rect_to_obb(rect, self.version)


def _obb_to_poly(boxes: Tensor) -> Tensor:
    """mmrotate ``obb2poly_{oc,le90,le135}`` (one formula): corners ``c -+ (w/2) u -+ (h/2) v``, ``[N, 8]``."""
    cx, cy, w, h, a = boxes.unbind(dim=-1)
    cos, sin = torch.cos(a), torch.sin(a)
    wx, wy, hx, hy = w / 2 * cos, w / 2 * sin, -h / 2 * sin, h / 2 * cos
    return torch.stack([
        cx - wx - hx, cy - wy - hy, cx + wx - hx, cy + wy - hy, cx + wx + hx, cy + wy + hy, cx - wx + hx, cy - wy + hy,
    ], dim=-1)  # fmt: skip


def _rect_to_obb(polys: Tensor, version: str) -> Tensor:
    """mmrotate ``poly2obb_{oc,le90,le135}`` (torch versions): a rectangle's 4 corners in order to a rotated box.

    ``le90`` / ``le135``: ``w, h`` = the longer / shorter of the first two edges, the angle of the first edge if
    it is the longer, else of the edge from the first corner to the last, wrapped by :func:`norm_angle`; the
    centre is the middle of the first diagonal. ``oc``: the centre is the corners' mean, the angle
    ``atan2(-(x2 - x1), y2 - y1) mod pi/2`` (so ``[0, pi/2)`` here, unlike ``poly2obb_np_oc``'s ``(0, pi/2]``)
    and ``w``, ``h`` follow from the number of quarter turns removed.
    """
    points = polys.reshape(-1, 4, 2)
    p1, p2, p3, p4 = points.unbind(dim=1)
    edge1, edge2 = (p2 - p1).norm(dim=-1), (p3 - p2).norm(dim=-1)
    if version == "oc":
        theta = torch.atan2(-(p2[:, 0] - p1[:, 0]), p2[:, 1] - p1[:, 1])
        even = torch.remainder(torch.floor(theta / (math.pi * 0.5)), 2) == 0
        w, h = torch.where(even, edge2, edge1), torch.where(even, edge1, edge2)
        centre = points.sum(dim=1) / 4.0
        return torch.stack([centre[:, 0], centre[:, 1], w, h, torch.remainder(theta, math.pi * 0.5)], dim=1)
    angle1 = torch.atan2(p2[:, 1] - p1[:, 1], p2[:, 0] - p1[:, 0])
    angle2 = torch.atan2(p4[:, 1] - p1[:, 1], p4[:, 0] - p1[:, 0])
    angle = norm_angle(torch.where(edge1 > edge2, angle1, angle2), version)
    centre = (p1 + p3) / 2.0
    w, h = torch.maximum(edge1, edge2), torch.minimum(edge1, edge2)
    return torch.stack([centre[:, 0], centre[:, 1], w, h, angle], dim=1)


def _check_version(version: str) -> None:
    if version not in ANGLE_VERSIONS:
        raise ValueError(f"angle `version` must be one of {ANGLE_VERSIONS}, got {version!r}")


def _check_floats(values: Sequence[float], size: int, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) != size:
        raise ValueError(f"`{name}` must have {size} values, got {len(values)}: {values}")
    return values


def _check_boxes(t: Tensor, size: int, name: str, layout: str) -> Tensor:
    t = torch.as_tensor(t)
    if t.numel() == 0 and t.ndim <= 2:
        t = t.reshape(0, size)
    if t.ndim != 2 or t.shape[1] != size:
        raise ValueError(f"`{name}` must have shape [N, {size}] {layout}, got {list(t.shape)}")
    return t if t.is_floating_point() else t.float()
