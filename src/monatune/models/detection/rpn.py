"""The region proposal network as mmdetection 2.x's ``RPNHead`` trains and runs it, on torchvision's.

torchvision's ``RegionProposalNetwork`` differs from the release's RPN in three ways, each fixed here:

- anchors crossing the image border take no part in training (mmdet's ``allowed_border=0``): they
  are neither positives nor negatives, and the assigner never sees them (so a ground truth's
  best anchor is its best *inside* anchor). torchvision uses every anchor.
- the assigner is mmdet's ``MaxIoUAssigner`` (passed in as ``proposal_matcher``): low-quality
  matches need an IoU of at least ``min_pos_iou`` (0.3) and go to the ground truth they are best
  for. torchvision's ``Matcher`` accepts any IoU and keeps the anchor's own best ground truth.
- proposals are not filtered by size (mmdet's ``min_bbox_size=0``); torchvision drops boxes
  under 1e-3 px.

Everything else (per-level top-k, clipping, per-level NMS, sampling 256 anchors half positive,
sigmoid cross-entropy and smooth-L1 with beta 1/9 over the sampled anchors) already agrees.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork

__all__ = ["BorderRPN", "inside_anchors"]


def inside_anchors(anchors: Tensor, image_size: tuple[int, int], allowed_border: float = 0.0) -> Tensor:
    """mmdet's ``anchor_inside_flags``: anchors within ``allowed_border`` px of the (unpadded) image.

    A negative ``allowed_border`` lets every anchor in.
    """
    if allowed_border < 0:
        return torch.ones(len(anchors), dtype=torch.bool, device=anchors.device)
    h, w = image_size
    b = allowed_border
    return (anchors[:, 0] >= -b) & (anchors[:, 1] >= -b) & (anchors[:, 2] < w + b) & (anchors[:, 3] < h + b)


class BorderRPN(RegionProposalNetwork):
    """torchvision's RPN that trains only on anchors inside the image, with no proposal size filter.

    Args:
        *args: ``RegionProposalNetwork``'s.
        allowed_border: How far (px) an anchor may cross the image border and still train; the
            release: 0. Negative: every anchor trains (torchvision's behaviour).
        min_size: Proposals with a side under this are dropped (the release: 0, none).
        **kwargs: ``RegionProposalNetwork``'s (``proposal_matcher`` can replace its ``Matcher``
            after construction; see :class:`CascadeMaskRCNN`).
    """

    def __init__(self, *args: Any, allowed_border: float = 0.0, min_size: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allowed_border = allowed_border
        self.min_size = min_size
        self._image_sizes: list[tuple[int, int]] = []

    def forward(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        self._image_sizes = list(images.image_sizes)  # the unpadded sizes, for the border check
        return super().forward(images, features, targets)

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        labels, matched_gt_boxes = [], []
        for anchors_per_image, target, size in zip(anchors, targets, self._image_sizes):
            gt_boxes = target["boxes"]
            inside = inside_anchors(anchors_per_image, size, self.allowed_border)
            label = torch.full((len(anchors_per_image),), -1.0, device=anchors_per_image.device)  # -1: not trained on
            matched = torch.zeros_like(anchors_per_image)
            if gt_boxes.numel() == 0:
                label[inside] = 0.0
            else:
                idx = self.proposal_matcher(self.box_similarity(gt_boxes, anchors_per_image[inside]))
                inner = (idx >= 0).to(label.dtype)
                inner[idx == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0.0
                inner[idx == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1.0
                label[inside] = inner
                matched[inside] = gt_boxes[idx.clamp(min=0)].to(matched.dtype)
            labels.append(label)
            matched_gt_boxes.append(matched)
        return labels, matched_gt_boxes
