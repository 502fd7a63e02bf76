"""The maths of H2RBox-v2+'s losses (Yu et al., "H2RBox-v2: Incorporating Symmetry for Boosting
Horizontal Box Supervised Oriented Object Detection", NeurIPS 2023), as the release's
``H2RBoxV2PHead`` computes them with mmdetection 2.x's losses.

- :func:`distance_to_le90`: mmrotate ``DistanceAnglePointCoder.decode`` (point + (l, t, r, b) + angle);
- :func:`projection_iou_loss`: the circumscribed-projection IoU loss (``nested_projection`` then
  mmdet ``IoULoss(mode="log")`` weighted by the centerness targets);
- :func:`centerness_targets`: FCOS's;
- :func:`symmetry_loss`: the self-supervised angle loss between an object and its rotated or
  flipped copy (mmdet ``SmoothL1Loss(beta=0.1, loss_weight=0.2)``);
- :func:`reduce_mean`: mmdet's ``reduce_mean`` (mean over the processes when distributed).

The focal and BCE losses are torchvision's and torch's; mmdet divides their sums by
``avg_factor + eps`` (float32 eps), kept here as :data:`AVG_EPS`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .psc import psc_decode

__all__ = [
    "AVG_EPS",
    "reduce_mean",
    "wrap_le90",
    "distance_to_le90",
    "centerness_targets",
    "projection_iou_loss",
    "symmetry_loss",
]

AVG_EPS = torch.finfo(torch.float32).eps  # mmdet weight_reduce_loss: sum / (avg_factor + eps)


def reduce_mean(value: Tensor) -> Tensor:
    """The mean of ``value`` over the processes of an initialised process group (else ``value``)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.clone()
    dist.all_reduce(value.div_(dist.get_world_size()), op=dist.ReduceOp.SUM)
    return value


def wrap_le90(theta: Tensor) -> Tensor:
    """mmrotate ``norm_angle(theta, "le90")``: ((theta + pi/2) mod pi) - pi/2."""
    return (theta + math.pi / 2) % math.pi - math.pi / 2


def distance_to_le90(points: Tensor, distances: Tensor, theta: Tensor) -> Tensor:
    """Boxes from points, their distances to the four sides and the box angles.

    Args:
        points: ``[P, 2]`` (x, y).
        distances: ``[P, 4]`` (left, top, right, bottom) along the box's own axes.
        theta: ``[P]`` angles (radians, le90 sense: w-axis (cos, sin), y down).

    Returns:
        ``[P, 5]`` (cx, cy, w, h, theta) with theta wrapped to [-pi/2, pi/2); the centre uses the
        unwrapped angle, as mmrotate's ``distance2obb``.
    """
    cos, sin = torch.cos(theta), torch.sin(theta)
    rotation = torch.stack([cos, -sin, sin, cos], dim=-1).reshape(-1, 2, 2)
    wh = distances[:, :2] + distances[:, 2:]
    offset = torch.bmm(rotation, ((distances[:, 2:] - distances[:, :2]) / 2).unsqueeze(2)).squeeze(2)
    return torch.cat([points + offset, wh, wrap_le90(theta)[:, None]], dim=-1)


def centerness_targets(distances: Tensor) -> Tensor:
    """FCOS centerness sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of ``[P, 4]`` (l, t, r, b)."""
    lr, tb = distances[:, [0, 2]], distances[:, [1, 3]]
    if len(lr) == 0:
        return lr[..., 0]
    ratio = (lr.min(dim=-1).values / lr.max(dim=-1).values) * (tb.min(dim=-1).values / tb.max(dim=-1).values)
    return torch.sqrt(ratio)


def _projections(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``nested_projection``: the target's (w, h) box as is, the prediction's circumscribed box
    after turning it by its angle minus the target's; both as x1, y1, x2, y2."""
    target_xyxy = torch.cat([target[:, :2] - target[:, 2:4] / 2, target[:, :2] + target[:, 2:4] / 2], dim=-1)
    delta = pred[:, 4] - target[:, 4]
    cos, sin = torch.cos(delta).abs(), torch.sin(delta).abs()
    w, h = pred[:, 2], pred[:, 3]
    wh = torch.stack([cos * w + sin * h, sin * w + cos * h], dim=-1)
    pred_xyxy = torch.cat([pred[:, :2] - wh / 2, pred[:, :2] + wh / 2], dim=-1)
    return pred_xyxy, target_xyxy


def projection_iou_loss(pred: Tensor, target: Tensor, weight: Tensor, avg_factor: float | Tensor, eps: float = 1e-6) -> Tensor:
    """H2RBox-v2's box loss: -ln IoU of the axis-aligned projections, weighted and averaged.

    Args:
        pred: ``[P, 5]`` predicted boxes (their angle is used, detached by the caller).
        target: ``[P, 5]`` target boxes (their (w, h) box is taken axis-aligned; the angle only sets
            the prediction's turn).
        weight: ``[P]`` per-box weights (the centerness targets).
        avg_factor: The divisor of the weighted sum.
        eps: mmdet ``IoULoss``/``bbox_overlaps``'s: union and IoU are clamped to at least eps.

    Returns:
        The loss (a scalar). Where no weight is positive, mmdet returns ``(pred * weight).sum()``.
    """
    pred_xyxy, target_xyxy = _projections(pred, target)
    if not torch.any(weight > 0):
        return (pred_xyxy * weight[:, None]).sum()
    lt = torch.max(pred_xyxy[:, :2], target_xyxy[:, :2])
    rb = torch.min(pred_xyxy[:, 2:], target_xyxy[:, 2:])
    overlap = (rb - lt).clamp(min=0).prod(dim=-1)
    area_pred = (pred_xyxy[:, 2] - pred_xyxy[:, 0]) * (pred_xyxy[:, 3] - pred_xyxy[:, 1])
    area_target = (target_xyxy[:, 2] - target_xyxy[:, 0]) * (target_xyxy[:, 3] - target_xyxy[:, 1])
    union = torch.clamp(area_pred + area_target - overlap, min=eps)
    loss = -(overlap / union).clamp(min=eps).log()
    return (loss * weight).sum() / (avg_factor + AVG_EPS)


def _smooth_l1(x: Tensor, beta: float) -> Tensor:
    x = x.abs()
    return torch.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)


def symmetry_loss(
    codes: Tensor,
    ids: Tensor,
    labels: Tensor,
    view: tuple[str, float],
    square_classes: Sequence[int] = (),
    *,
    beta: float = 0.1,
    weight: float = 0.2,
) -> Tensor:
    """H2RBox-v2's self-supervised angle loss over the positive points of both views.

    Each object's angle codes are averaged per view (ids ``k`` in the original, ``k + 0.5`` in the
    view), then decoded; objects seen in both views compare their angles: for a rotation by ``rot``
    d = theta_view - theta_orig - rot, for a vertical flip d = theta_orig + theta_view, wrapped to
    [-pi/2, pi/2) and 0 for square classes (which still count in the mean).

    Args:
        codes: ``[P, 3]`` raw PSC codes of the positive points.
        ids: ``[P]`` their objects' ids (float: k or k + 0.5, k >= 1).
        labels: ``[P]`` their 0-based class indices.
        view: ``("rot", angle)`` or ``("flp", 0)``.
        square_classes: 0-based classes whose angle is not learnt.
        beta, weight: The smooth-L1's beta and the loss weight.

    Returns:
        ``weight * mean(smooth_l1(d))`` over the pairs; 0 (still in the graph) without pairs.
    """
    unique, inverse = torch.unique(ids, return_inverse=True)  # sorted: k then k + 0.5
    counts = torch.bincount(inverse, minlength=len(unique)).to(codes.dtype)
    mean_codes = codes.new_zeros(len(unique), codes.shape[-1]).index_add_(0, inverse, codes) / counts[:, None]
    object_labels = labels.new_zeros(len(unique)).scatter_(0, inverse, labels)  # one label per id
    _, objects, per_object = torch.unique(unique.long(), return_inverse=True, return_counts=True)
    paired = per_object[objects] == 2
    pairs = mean_codes[paired].view(-1, 2, codes.shape[-1])
    if len(pairs) == 0:
        return pairs.sum()
    pair_labels = object_labels[paired].view(-1, 2)[:, 0]
    original, turned = psc_decode(pairs[:, 0]), psc_decode(pairs[:, 1])
    kind, angle = view
    d = turned - original - angle if kind == "rot" else original + turned
    d = wrap_le90(d)
    square = torch.isin(pair_labels, torch.as_tensor(list(square_classes), dtype=pair_labels.dtype, device=d.device))
    d = torch.where(square, torch.zeros_like(d), d)
    return weight * _smooth_l1(d, beta).mean()
