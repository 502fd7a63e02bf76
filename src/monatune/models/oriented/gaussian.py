"""The KLD box loss (Yang et al., "Learning High-Precision Bounding Box for Rotated Object Detection via
Kullback-Leibler Divergence", NeurIPS 2021) as the release's ``GDLoss_v1(loss_type="kld")`` computes it
(``mmrotate/models/losses/gaussian_dist_loss_v1.py``).

A rotated box ``(cx, cy, w, h, a)`` becomes the Gaussian ``N(mu, Sigma)`` with ``mu = (cx, cy)`` and
``Sigma = R(a) diag((w/2)^2, (h/2)^2) R(a)^T`` (``w``, ``h`` clamped to ``[1e-7, 1e7]`` first). Between a
prediction ``p`` and its target ``t``::

    D = delta^T Sigma_t^-1 delta + tr(Sigma_t^-1 Sigma_p) + ln(|Sigma_t| / |Sigma_p|) - 2     (= 2 KL(p || t))
    loss = 1 - 1 / (tau + ln(1 + max(D, 1e-6)))         ("log1p"; "sqrt" uses sqrt(max(D, 1e-6)))

with ``delta = mu_p - mu_t``. The Gaussian ignores which side is called ``w`` and the angle's multiples of
``pi``, so the loss is the same whatever angle convention (``oc``, ``le90``) the boxes are written in.

The release forms the 2 x 2 matrices and calls ``torch.inverse`` and ``torch.det``; here the same quantities
come in closed form from the boxes (no special ops, and better conditioned for thin boxes):
``delta`` turned into the target's frame, ``(u, v)``, gives ``4 u^2 / w_t^2 + 4 v^2 / h_t^2``; with
``d = a_p - a_t`` the trace is ``(w_p^2 cos^2 d + h_p^2 sin^2 d) / w_t^2 + (w_p^2 sin^2 d + h_p^2 cos^2 d) / h_t^2``;
and ``ln(|Sigma_t| / |Sigma_p|) = 2 ln(w_t h_t / (w_p h_p))``. They agree with the release's to float rounding.

Reduction (what the release's rotated RetinaNet ends up optimising with this loss): ``GDLoss_v1.forward``
keeps the boxes whose weight (the mean of the 5 bbox weights) is positive and returns their per-box losses
times ``loss_weight``: no ``avg_factor``, no weighting, no reduction (its ``reduction`` argument is unused).
Where no weight is positive it returns ``(pred * weight).sum()``, a zero. ``RotatedAnchorHead.loss`` calls it
once per FPN level (mmdet ``multi_apply`` over the levels, the batch's images together), and mmdet's
``BaseDetector._parse_losses`` turns the list into ``sum(level_loss.mean())``: the **mean over each level's
positive anchors, summed over the levels** (:func:`kld_level_loss`). A level with few positives therefore
weighs as much as one with many, and the loss is not divided by the number of positives of the batch as
the focal loss is.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FUNS", "box_to_gaussian", "divergence", "kld_loss", "kld_level_loss"]

FUNS = ("log1p", "sqrt")
_WH_MIN, _WH_MAX = 1e-7, 1e7  # xy_wh_r_2_xy_sigma's clamp
_DIST_MIN = 1e-6  # kld_loss's clamp of D


def box_to_gaussian(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """mmrotate ``xy_wh_r_2_xy_sigma``: the mean ``[..., 2]`` and covariance ``[..., 2, 2]`` of rotated boxes.

    Args:
        boxes: ``[..., 5]`` ``(cx, cy, w, h, a)``, ``a`` in radians (any angle convention).
    """
    if boxes.shape[-1] != 5:
        raise ValueError(f"`boxes` must have shape [..., 5] (cx, cy, w, h, a), got {list(boxes.shape)}")
    wh = boxes[..., 2:4].clamp(min=_WH_MIN, max=_WH_MAX)
    cos, sin = torch.cos(boxes[..., 4]), torch.sin(boxes[..., 4])
    rotation = torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))
    sigma = rotation @ torch.diag_embed((wh / 2).square()) @ rotation.transpose(-1, -2)
    return boxes[..., :2], sigma


def kld_loss(pred: Tensor, target: Tensor, *, fun: str = "log1p", tau: float = 1.0) -> Tensor:
    """Per-box KLD loss ``[N]`` of predicted boxes against their targets (mmrotate ``kld_loss``, not reduced).

    Args:
        pred: ``[N, 5]`` predicted ``(cx, cy, w, h, a)`` (differentiable).
        target: ``[N, 5]`` target boxes.
        fun: ``"log1p"`` (the release's configs) or ``"sqrt"``, applied to the divergence. (The release's
            ``kld_loss`` treats any other value, e.g. ``""``, as ``"log1p"``.)
        tau: The constant in ``1 - 1 / (tau + f(D))``.

    Returns:
        ``1 - 1 / (tau + f(max(D, 1e-6)))`` per box, ``D = 2 KL(N_pred || N_target)``.
    """
    if fun not in FUNS:
        raise ValueError(f"`fun` must be one of {FUNS}, got {fun!r}")
    if pred.ndim != 2 or pred.shape[-1] != 5 or pred.shape != target.shape:
        raise ValueError(f"`pred` and `target` must both be [N, 5] (cx, cy, w, h, a), got {list(pred.shape)} and "
                         f"{list(target.shape)}")  # fmt: skip
    return _kld_from_distance(divergence(pred, target), fun, tau)


def divergence(pred: Tensor, target: Tensor) -> Tensor:
    """``D = 2 KL(N_pred || N_target)`` ``[N]`` of the boxes' Gaussians, in closed form (before the 1e-6 clamp)."""
    xp, yp, ap = pred[:, 0], pred[:, 1], pred[:, 4]
    xt, yt, at = target[:, 0], target[:, 1], target[:, 4]
    wp, hp = pred[:, 2].clamp(_WH_MIN, _WH_MAX), pred[:, 3].clamp(_WH_MIN, _WH_MAX)
    wt, ht = target[:, 2].clamp(_WH_MIN, _WH_MAX), target[:, 3].clamp(_WH_MIN, _WH_MAX)
    dx, dy = xp - xt, yp - yt
    cos_t, sin_t = torch.cos(at), torch.sin(at)
    u, v = cos_t * dx + sin_t * dy, -sin_t * dx + cos_t * dy  # delta in the target's frame
    centre = 4 * (u.square() / wt.square() + v.square() / ht.square())  # delta^T Sigma_t^-1 delta
    cos2, sin2 = torch.cos(ap - at).square(), torch.sin(ap - at).square()
    trace = (wp.square() * cos2 + hp.square() * sin2) / wt.square()  # tr(Sigma_t^-1 Sigma_p)
    trace = trace + (wp.square() * sin2 + hp.square() * cos2) / ht.square()
    log_det = 2 * (torch.log(wt) + torch.log(ht) - torch.log(wp) - torch.log(hp))  # ln(|Sigma_t| / |Sigma_p|)
    return centre + trace + log_det - 2


def _kld_from_distance(distance: Tensor, fun: str, tau: float) -> Tensor:
    distance = distance.clamp(min=_DIST_MIN)
    return 1 - 1 / (tau + (torch.sqrt(distance) if fun == "sqrt" else torch.log1p(distance)))


def kld_level_loss(pred: Tensor, target: Tensor, levels: Tensor, num_levels: int, *, fun: str = "log1p",
                   tau: float = 1.0, loss_weight: float = 1.0) -> Tensor:  # fmt: skip
    """The release's KLD box loss of a batch: per-box losses averaged within each FPN level, summed over levels.

    ``GDLoss_v1`` per level (no ``avg_factor``) followed by mmdet ``_parse_losses``' ``sum(l.mean())``;
    levels without a positive anchor add 0. With no positive at all the result is ``pred.sum() * 0`` (a
    zero that keeps the graph).

    Args:
        pred: ``[P, 5]`` decoded boxes of the batch's positive anchors (any levels, any images).
        target: ``[P, 5]`` their ground-truth boxes.
        levels: ``[P]`` int64 level of each positive anchor (0 .. num_levels - 1).
        num_levels: Number of FPN levels.
        fun, tau: See :func:`kld_loss`.
        loss_weight: Multiplies the per-box losses (the release: 1).
    """
    if len(pred) == 0:
        return pred.sum() * 0
    per_box = kld_loss(pred, target, fun=fun, tau=tau) * loss_weight
    sums = per_box.new_zeros(num_levels).index_add(0, levels, per_box)
    counts = torch.bincount(levels, minlength=num_levels)
    present = counts > 0
    return (sums[present] / counts[present].to(sums.dtype)).sum()
