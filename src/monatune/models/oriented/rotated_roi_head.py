"""The rotated RoI head of Oriented R-CNN as the release's ``OrientedStandardRoIHead`` trains and runs it.

Training (mmdet ``StandardRoIHead.forward_train`` with mmrotate's parts), per image:

1. assign the RPN's rotated proposals to the ground truth by **rotated** IoU (``MaxIoUAssigner`` with
   ``RBboxOverlaps2D``: positive at >= 0.5, negative below 0.5, no low-quality matches; sides clamped to
   >= 1e-3 as ``rbbox_overlaps`` does), then put the ground truth in front as proposals of their own
   (``RRandomSampler``'s ``add_gt_as_proposals``: each is a positive of itself, whatever its IoU);
2. sample 512 with at most 25% positives (torchvision's ``BalancedPositiveNegativeSampler`` has mmdet's
   counts: ``int(512 * 0.25)`` positives at most, negatives fill up to 512);
3. pool 7 x 7 features on the rotated boxes (:class:`~monatune.ops.roi_align_rotated.MultiScaleRotatedRoIAlign`);
4. :class:`RotatedBoxHead` (``RotatedShared2FCBBoxHead``): two fc of 1024 with ReLU (torchvision's
   ``TwoMLPHead``), a classifier over K + 1 classes (the background **last**, mmdet's layout, so a release
   checkpoint's ``fc_cls`` maps row for row) and 5 class-agnostic deltas (:class:`~.coders.DeltaXYWHACoder`,
   le90, ``edge_swap``, ``proj_xy``, stds 0.1, 0.1, 0.2, 0.2, 0.1);
5. mmdet ``BBoxHead.loss``: softmax cross-entropy averaged over the sampled RoIs; smooth-L1 (beta 1) on the
   positives' deltas, summed and divided by the number of sampled RoIs of the batch.

Inference (``simple_test_bboxes`` + ``RotatedBBoxHead.get_bboxes`` + ``multiclass_nms_rotated``): softmax,
the one box per RoI decoded with its centre clamped to the (resized, unpadded) image, mapped back to the
input's pixels, every (RoI, class) pair scoring above ``score_threshold`` kept, rotated NMS per class at
IoU > ``nms_iou`` (:func:`monatune.ops.batched_rotated_nms`; torchvision has no rotated NMS), the best
``max_per_image``.

Labels here follow torchvision: 0 is the background, 1..K the classes.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.faster_rcnn import TwoMLPHead

from ...ops import batched_rotated_nms, rotated_box_iou
from ...ops.roi_align_rotated import MultiScaleRotatedRoIAlign
from ..detection.assign import MaxIoUAssigner
from .coders import DeltaXYWHACoder

__all__ = ["RotatedBoxHead", "RotatedRoIHead", "SampledRoIs", "release_roi_coder"]


def release_roi_coder() -> DeltaXYWHACoder:
    """The release's RoI-head coder: ``DeltaXYWHAOBBoxCoder(le90, edge_swap, proj_xy, stds (.1, .1, .2, .2, .1))``."""
    return DeltaXYWHACoder(stds=(0.1, 0.1, 0.2, 0.2, 0.1), version="le90", edge_swap=True, proj_xy=True)


class RotatedBoxHead(nn.Module):
    """mmrotate ``RotatedShared2FCBBoxHead`` with ``reg_class_agnostic=True``.

    ``forward(x)`` maps pooled features ``[R, C, S, S]`` to class logits ``[R, K + 1]`` (background last) and
    deltas ``[R, 5]``.

    Initialisation, as the release's ``init_cfg`` resolves: ``RotatedBBoxHead`` asks for normal(0.01) on
    ``fc_cls`` and normal(0.001) on ``fc_reg``, but ``RotatedConvFCBBoxHead`` appends
    ``dict(type='Xavier', layer='Linear', override=...)``, applied after them, and its ``layer='Linear'`` reaches
    every ``nn.Linear`` of the head: so all four layers end Xavier (mmcv's default, normal distribution, gain 1)
    with zero bias. (mmdet 2.x's own ``ConvFCBBoxHead`` has no ``layer`` key and keeps the normal inits.)

    Args:
        in_channels: Channels of the pooled features (the FPN's 256).
        num_classes: Object classes K.
        roi_size: Side of the pooled features (7).
        fc_channels: Width of the two shared fc layers (1024).
    """

    def __init__(self, in_channels: int, num_classes: int, *, roi_size: int = 7, fc_channels: int = 1024) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.shared_fcs = TwoMLPHead(in_channels * roi_size * roi_size, fc_channels)  # fc6, fc7, each with ReLU
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 5)
        for fc in (self.shared_fcs.fc6, self.shared_fcs.fc7, self.fc_cls, self.fc_reg):
            nn.init.xavier_normal_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.shared_fcs(x)  # R, fc_channels
        return self.fc_cls(x), self.fc_reg(x)  # R, K + 1 and R, 5


class SampledRoIs(NamedTuple):
    """One image's sampled RoIs, positives first (the ground-truth copies in front), then negatives."""

    rois: Tensor  # S, 5 le90
    labels: Tensor  # S, 0 background, 1..K
    matched: Tensor  # S, 5 the matched ground truth (zeros for negatives)
    is_gt: Tensor  # S, bool: a ground-truth copy


class RotatedRoIHead(nn.Module):
    """Oriented R-CNN's RoI head: sampling, rotated RoIAlign, :class:`RotatedBoxHead`, losses and detections.

    Args:
        roi_align: The extractor (the release: strides 4-32, 7 x 7, sampling 2, clockwise, aligned).
        box_head: The fc head.
        coder: Delta coder of the boxes (:func:`release_roi_coder`).
        iou_threshold: Rotated IoU at or above which a proposal is positive, below which negative (0.5).
        batch_size_per_image: RoIs sampled per image (512).
        positive_fraction: Most positive share of them (0.25).
        score_threshold: Class probability a detection must exceed (0.05).
        nms_iou: Rotated NMS threshold per class (suppress above; 0.1).
        max_per_image: Detections kept per image (2000).
    """

    def __init__(
        self,
        roi_align: MultiScaleRotatedRoIAlign,
        box_head: RotatedBoxHead,
        *,
        coder: DeltaXYWHACoder | None = None,
        iou_threshold: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_threshold: float = 0.05,
        nms_iou: float = 0.1,
        max_per_image: int = 2000,
    ) -> None:
        super().__init__()
        self.roi_align, self.box_head = roi_align, box_head
        self.num_classes = box_head.num_classes
        self.coder = coder if coder is not None else release_roi_coder()
        # mmdet MaxIoUAssigner(pos_iou_thr=neg_iou_thr=min_pos_iou=0.5, match_low_quality=False)
        self.assigner = MaxIoUAssigner(iou_threshold, iou_threshold, min_pos_iou=iou_threshold, match_low_quality=False)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.score_threshold, self.nms_iou = float(score_threshold), float(nms_iou)
        self.max_per_image = int(max_per_image)

    def sample(self, proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> SampledRoIs:
        """Assign and sample one image's proposals (mmrotate ``OrientedStandardRoIHead.forward_train``'s loop).

        Args:
            proposals: ``[P, 5]`` le90 proposals (detached).
            gt_boxes: ``[G, 5]`` le90 ground truth.
            gt_labels: ``[G]`` labels in 1..K.
        """
        proposals = proposals.detach()
        device = proposals.device
        if len(gt_boxes):
            # RBboxOverlaps2D clamps the sides to >= 1e-3 before mmcv's box_iou_rotated
            iou = rotated_box_iou(_clamp_sides(gt_boxes), _clamp_sides(proposals))
            idx = self.assigner(iou) if len(proposals) else torch.zeros(0, dtype=torch.long, device=device)
            idx = torch.cat([torch.arange(len(gt_boxes), device=device), idx])  # add_gt_as_proposals: gt first
            boxes = torch.cat([gt_boxes.to(proposals.dtype), proposals])
            labels = torch.where(idx >= 0, gt_labels[idx.clamp(min=0)], 0)
            labels[idx == self.assigner.BETWEEN_THRESHOLDS] = -1  # none with equal thresholds; kept for other ones
            matched = gt_boxes.to(proposals.dtype)[idx.clamp(min=0)]
        else:
            boxes, labels = proposals, torch.zeros(len(proposals), dtype=torch.long, device=device)
            matched = torch.zeros_like(proposals)
        is_gt = torch.arange(len(boxes), device=device) < len(gt_boxes)
        pos, neg = self.sampler([labels])
        keep = torch.cat([torch.nonzero(pos[0])[:, 0], torch.nonzero(neg[0])[:, 0]])  # ascending each, as mmdet
        return SampledRoIs(boxes[keep], labels[keep], matched[keep] * (labels[keep] > 0)[:, None], is_gt[keep])

    def forward_boxes(self, features: list[Tensor], rois: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Class logits ``[R, K + 1]`` and deltas ``[R, 5]`` of every image's RoIs, in ``torch.cat(rois)``'s order."""
        batched = torch.cat([torch.cat([r.new_full((len(r), 1), float(i)), r], dim=1) for i, r in enumerate(rois)])
        return self.box_head(self.roi_align(features, batched))

    def loss(self, features: list[Tensor], proposals: list[Tensor], gt_boxes: list[Tensor],
             gt_labels: list[Tensor]) -> dict[str, Tensor]:  # fmt: skip
        """``{"loss_cls", "loss_bbox"}`` of a batch (mmrotate ``RotatedBBoxHead.get_targets`` + ``loss``)."""
        samples = [self.sample(p, b, lab) for p, b, lab in zip(proposals, gt_boxes, gt_labels)]
        logits, deltas = self.forward_boxes(features, [s.rois for s in samples])
        rois = torch.cat([s.rois for s in samples])
        labels, matched = torch.cat([s.labels for s in samples]), torch.cat([s.matched for s in samples])
        return self.box_loss(logits, deltas, rois, labels, matched)

    def box_loss(
        self, logits: Tensor, deltas: Tensor, rois: Tensor, labels: Tensor, matched: Tensor
    ) -> dict[str, Tensor]:
        """mmdet ``BBoxHead.loss`` (class-agnostic): CE over ``max(#sampled, 1)``, smooth-L1 over ``#sampled``.

        Args:
            logits: ``[R, K + 1]`` (background last).
            deltas: ``[R, 5]``.
            rois: ``[R, 5]`` the sampled RoIs.
            labels: ``[R]`` 0 background, 1..K.
            matched: ``[R, 5]`` each positive's ground truth.
        """
        logits, deltas = logits.float(), deltas.float()
        targets = torch.where(labels > 0, labels - 1, self.num_classes)  # mmdet: classes 0..K-1, background K
        loss_cls = F.cross_entropy(logits, targets, reduction="sum") / max(len(labels), 1)
        pos = labels > 0
        if pos.any():
            goal = self.coder.encode(rois[pos], matched[pos])
            loss_bbox = F.smooth_l1_loss(deltas[pos], goal, beta=1.0, reduction="sum") / len(labels)
        else:
            loss_bbox = deltas[pos].sum()  # 0, in the graph
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}

    @torch.no_grad()
    def predict(self, features: list[Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                factors: list[Tensor | None]) -> list[dict[str, Tensor]]:  # fmt: skip
        """Detections per image: ``{"boxes": le90 [N, 5], "scores": [N], "labels": [N] in 1..K}``.

        Args:
            features: The FPN maps (the first four are pooled).
            proposals: Per image ``[P, 5]`` le90 proposals.
            image_sizes: Per image ``(H, W)`` of the (resized) image before padding: the decoded centres are
                clamped to ``[0, W - 1] x [0, H - 1]``.
            factors: Per image None, or mmdet's scale factor ``(w, h, w, h)``; cx, cy, w, h are divided by it.
        """
        if sum(len(p) for p in proposals) == 0:
            return [self._empty(p) for p in proposals]
        logits, deltas = self.forward_boxes(features, proposals)
        results = []
        sizes = [len(p) for p in proposals]
        for p, lg, d, size, factor in zip(proposals, logits.split(sizes), deltas.split(sizes), image_sizes, factors):
            if len(p) == 0:
                results.append(self._empty(p))
                continue
            boxes = self.coder.decode(p.float(), d.float(), max_shape=size)
            if factor is not None:  # rescale=True: back to the input's pixels before NMS
                boxes = torch.cat([boxes[:, :4] / factor.to(boxes), boxes[:, 4:]], dim=1)
            results.append(self._nms(boxes, F.softmax(lg.float(), dim=-1)))
        return results

    def _nms(self, boxes: Tensor, scores: Tensor) -> dict[str, Tensor]:
        """mmrotate ``multiclass_nms_rotated`` for class-agnostic boxes ``[P, 5]`` and scores ``[P, K + 1]``."""
        scores = scores[:, :-1]  # the background column is dropped
        roi, label = torch.nonzero(scores > self.score_threshold, as_tuple=True)
        boxes, scores = boxes[roi], scores[roi, label]
        keep = batched_rotated_nms(boxes, scores, label, self.nms_iou)
        if self.max_per_image > 0:
            keep = keep[: self.max_per_image]
        return {"boxes": boxes[keep].float(), "scores": scores[keep], "labels": label[keep] + 1}

    def _empty(self, like: Tensor) -> dict[str, Tensor]:
        return {"boxes": like.new_zeros((0, 5), dtype=torch.float32), "scores": like.new_zeros(0, dtype=torch.float32),
                "labels": torch.zeros(0, dtype=torch.long, device=like.device)}  # fmt: skip


def _clamp_sides(boxes: Tensor) -> Tensor:
    return torch.cat([boxes[:, :2], boxes[:, 2:4].clamp(min=1e-3), boxes[:, 4:5]], dim=1)
