"""mmdetection 2.x's ``MaxIoUAssigner`` with torchvision ``Matcher``'s call and return convention.

The two agree on positives (IoU >= ``pos_iou_thr``) and negatives (below ``neg_iou_thr``) but not
on low-quality matches. mmdet, for each ground truth in turn whose best IoU is at least
``min_pos_iou``, makes every anchor with that best IoU a positive *of that ground truth* (a later
ground truth overrides an earlier one). torchvision's ``Matcher(allow_low_quality_matches=True)``
accepts any best IoU, however small, and gives such an anchor its own best ground truth.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MaxIoUAssigner"]


class MaxIoUAssigner:
    """Assign each anchor (or proposal) a ground truth by IoU, as mmdet's ``MaxIoUAssigner``.

    ``assigner(iou)`` takes the (G, N) IoU of G ground truths and N anchors and returns (N,)
    int64: the matched ground truth's index, ``BELOW_LOW_THRESHOLD`` (-1) for negatives and
    ``BETWEEN_THRESHOLDS`` (-2) for anchors that are neither; a drop-in for torchvision's ``Matcher``.

    Args:
        pos_iou_thr: IoU at or above which an anchor is a positive of its best ground truth.
        neg_iou_thr: IoU below which (and >= 0) an anchor is a negative.
        min_pos_iou: The least IoU a low-quality match needs (the release's RPN: 0.3; RetinaNet: 0).
        match_low_quality: Give each ground truth its best anchors even below ``pos_iou_thr``
            (mmdet 2.11's default: True).
        gt_max_assign_all: All anchors tied at a ground truth's best IoU, or only the first.
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(
        self,
        pos_iou_thr: float,
        neg_iou_thr: float,
        *,
        min_pos_iou: float = 0.0,
        match_low_quality: bool = True,
        gt_max_assign_all: bool = True,
    ) -> None:
        if neg_iou_thr > pos_iou_thr:
            raise ValueError(f"`neg_iou_thr` ({neg_iou_thr}) must not exceed `pos_iou_thr` ({pos_iou_thr})")
        self.pos_iou_thr, self.neg_iou_thr, self.min_pos_iou = pos_iou_thr, neg_iou_thr, min_pos_iou
        self.match_low_quality, self.gt_max_assign_all = match_low_quality, gt_max_assign_all

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(pos_iou_thr={self.pos_iou_thr}, neg_iou_thr={self.neg_iou_thr}, "
                f"min_pos_iou={self.min_pos_iou}, match_low_quality={self.match_low_quality})")  # fmt: skip

    def __call__(self, iou: Tensor) -> Tensor:
        if iou.numel() == 0 or iou.shape[0] == 0:
            raise ValueError("no ground truth to assign (an image without boxes has only negatives; handle it before)")
        best, best_gt = iou.max(dim=0)  # per anchor
        matches = torch.full_like(best_gt, self.BETWEEN_THRESHOLDS)
        matches[(best >= 0) & (best < self.neg_iou_thr)] = self.BELOW_LOW_THRESHOLD
        positive = best >= self.pos_iou_thr
        matches[positive] = best_gt[positive]
        if self.match_low_quality:
            gt_best = iou.max(dim=1).values  # per ground truth
            if self.gt_max_assign_all:
                hit = iou == gt_best[:, None]
            else:
                hit = torch.zeros_like(iou, dtype=torch.bool)
                hit[torch.arange(len(iou), device=iou.device), iou.argmax(dim=1)] = True
            hit &= (gt_best >= self.min_pos_iou)[:, None]
            # the last ground truth that claims an anchor wins, as mmdet's loop over ground truths
            last = len(iou) - 1 - hit.flip(0).int().argmax(dim=0)
            claimed = hit.any(dim=0)
            matches[claimed] = last[claimed]
        return matches
