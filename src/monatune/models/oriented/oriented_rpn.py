"""The oriented RPN of Oriented R-CNN (Xie et al., ICCV 2021) as the release's ``OrientedRPNHead`` trains and runs it.

mmrotate's ``OrientedRPNHead`` is mmdet 2.x's RPN with three changes, which torchvision's
``RegionProposalNetwork`` (through monatune's :class:`~monatune.models.detection.rpn.BorderRPN`) cannot
express on its own:

- the box branch predicts **6** midpoint-offset deltas per anchor (:class:`~.coders.MidpointOffsetCoder`,
  stds 1, 1, 1, 1, 0.5, 0.5); torchvision hard-codes 4 (``concat_box_prediction_layers``, ``BoxCoder``);
- anchors are assigned by **horizontal** IoU against each ground truth's circumscribed box
  (mmrotate ``obb2xyxy``), but the regression target is the rotated ground truth itself;
- proposals are **rotated** boxes: per level the top ``pre_nms_top_n`` anchors by score are decoded,
  not clipped to the image, and NMS at 0.8 runs on their circumscribed boxes, separately per level
  (mmcv ``batched_nms`` with the level as category); the best ``post_nms_top_n`` of an image are kept.

What is reused as it is: torchvision's ``RPNHead`` (3x3 conv + ReLU, 1x1 objectness, normal(0.01) init,
its box conv widened to 6 per anchor), ``BalancedPositiveNegativeSampler`` (256 anchors, at most half
positive: mmdet ``RandomSampler``), ``_get_top_n_idx`` and ``batched_nms``; monatune's mmdet anchors
(:class:`~monatune.models.detection.anchors.MMDetAnchorGenerator`), ``MaxIoUAssigner`` (0.7 / 0.3,
low-quality matches at >= 0.3) and the border rule of ``BorderRPN`` (``allowed_border=0``: anchors
crossing the unpadded image take no part in training).

The losses are mmdet's: sigmoid cross-entropy over the sampled anchors and smooth-L1 (beta 1/9) over
the positives' 6 deltas, both summed and divided by mmdet's ``avg_factor``, the sum over images of
``max(#pos, 1) + max(#neg, 1)`` (torchvision divides by the number of sampled anchors, which differs
only for an image without positives, e.g. one without ground truth).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RPNHead, permute_and_flatten
from torchvision.ops import batched_nms, box_iou

from ..detection.anchors import MMDetAnchorGenerator
from ..detection.assign import MaxIoUAssigner
from ..detection.rpn import BorderRPN, inside_anchors
from .coders import MidpointOffsetCoder

__all__ = ["OrientedRPN", "build_oriented_rpn_head", "obb_to_xyxy"]


def obb_to_xyxy(boxes: Tensor) -> Tensor:
    """mmrotate ``obb2xyxy_le90``: the circumscribed axis-aligned box ``(x1, y1, x2, y2)`` of ``[N, 5]`` boxes.

    ``c -+ (|w/2 cos| + |h/2 sin|, |w/2 sin| + |h/2 cos|)``; right for any angle convention.
    """
    centre, w, h, theta = boxes.split([2, 1, 1, 1], dim=-1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    half = torch.cat([(w / 2 * cos).abs() + (h / 2 * sin).abs(), (w / 2 * sin).abs() + (h / 2 * cos).abs()], dim=-1)
    return torch.cat([centre - half, centre + half], dim=-1)


def build_oriented_rpn_head(in_channels: int, num_anchors: int = 3) -> RPNHead:
    """torchvision's ``RPNHead`` with a 6-delta box conv: mmrotate ``OrientedRPNHead``'s layers.

    ``conv`` (3x3, ReLU), ``cls_logits`` (``num_anchors`` sigmoid logits), ``bbox_pred`` (``6 * num_anchors``);
    every conv normal(std 0.01), bias 0, as the release's ``init_cfg`` (and torchvision's).
    """
    head = RPNHead(in_channels, num_anchors)
    head.bbox_pred = nn.Conv2d(in_channels, num_anchors * 6, kernel_size=1)
    nn.init.normal_(head.bbox_pred.weight, std=0.01)
    nn.init.zeros_(head.bbox_pred.bias)
    return head


class OrientedRPN(BorderRPN):
    """The oriented RPN: rotated proposals from axis-aligned anchors and midpoint-offset deltas.

    ``forward(images, features, targets)`` returns ``(proposals, losses)``: per image ``[K, 5]`` rotated
    proposals (le90, by descending score, detached) and, when targets are given, ``{"loss_rpn_cls",
    "loss_rpn_bbox"}`` (else ``{}``). Targets per image: ``{"boxes": le90 [G, 5]}``.

    Args:
        anchor_generator: The anchors (the release: :class:`MMDetAnchorGenerator` with scale 8, ratios
            0.5 / 1 / 2 on strides 4-64).
        head: Objectness and 6 deltas per anchor (:func:`build_oriented_rpn_head`).
        coder: The delta coder (the release: ``MidpointOffsetCoder(stds=(1, 1, 1, 1, 0.5, 0.5), version="le90")``).
        fg_iou_thresh, bg_iou_thresh, min_pos_iou: ``MaxIoUAssigner``'s thresholds (0.7, 0.3, 0.3).
        batch_size_per_image, positive_fraction: Anchors sampled per image and their positive share (256, 0.5).
        pre_nms_top_n: Anchors kept per level, by score, before NMS (2000).
        post_nms_top_n: Proposals kept per image after NMS (2000).
        nms_thresh: IoU of the circumscribed boxes above which NMS suppresses (0.8).
        allowed_border: How far (px) a training anchor may cross the image border (0; negative: no limit).
        min_size: Proposals with ``w`` or ``h`` under this are dropped before NMS (the release: 0, none).
    """

    def __init__(
        self,
        anchor_generator: MMDetAnchorGenerator,
        head: nn.Module,
        *,
        coder: MidpointOffsetCoder | None = None,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        min_pos_iou: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_top_n: int = 2000,
        post_nms_top_n: int = 2000,
        nms_thresh: float = 0.8,
        allowed_border: float = 0.0,
        min_size: float = 0.0,
    ) -> None:
        if int(pre_nms_top_n) < 1 or int(post_nms_top_n) < 1:
            raise ValueError(
                f"`pre_nms_top_n` and `post_nms_top_n` must be positive, got {pre_nms_top_n} and {post_nms_top_n}"
            )
        top = dict(training=int(pre_nms_top_n), testing=int(pre_nms_top_n))
        post = dict(training=int(post_nms_top_n), testing=int(post_nms_top_n))
        super().__init__(
            anchor_generator, head, fg_iou_thresh, bg_iou_thresh, batch_size_per_image, positive_fraction, top, post,
            nms_thresh, score_thresh=0.0, allowed_border=allowed_border, min_size=min_size,
        )
        self.proposal_matcher = MaxIoUAssigner(fg_iou_thresh, bg_iou_thresh, min_pos_iou=min_pos_iou)
        self.box_similarity = box_iou  # horizontal IoU of circumscribed ground truth and anchors
        self.box_coder = None  # torchvision's 4-delta coder does not apply; see `coder`
        self.coder = coder if coder is not None else MidpointOffsetCoder(stds=(1.0, 1.0, 1.0, 1.0, 0.5, 0.5))

    def forward(  # type: ignore[override]
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        self._image_sizes = [(int(h), int(w)) for h, w in images.image_sizes]
        maps = list(features.values())
        objectness, deltas = self.head(maps)
        # anchors in float32 whatever autocast made of the maps (only their shapes, dtype and device are read)
        anchors = self.anchor_generator(images, [m[:0].float() for m in maps])
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = _flatten(objectness, 1).squeeze(-1), _flatten(deltas, 6)  # B, N and B, N, 6
        proposals, _ = self.filter_proposals(anchors, objectness, deltas, num_anchors_per_level)
        losses: dict[str, Tensor] = {}
        if targets is not None:  # losses whenever targets are given (torchvision: in training mode only)
            labels, matched = self.assign_targets_to_anchors(anchors, targets)
            loss_cls, loss_bbox = self.compute_loss(objectness, deltas, labels, anchors, matched)
            losses = {"loss_rpn_cls": loss_cls, "loss_rpn_bbox": loss_bbox}
        return proposals, losses

    def assign_targets_to_anchors(  # type: ignore[override]
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: each anchor's label (1 positive, 0 negative, -1 not trained on) and matched rotated ground truth.

        The assigner compares the anchors inside the image with the ground truths' circumscribed boxes
        (mmrotate ``OrientedRPNHead._get_targets_single``); the matched box is the rotated ground truth.
        """
        labels, matched_boxes = [], []
        for anchors_per_image, target, size in zip(anchors, targets, self._image_sizes):
            gt = target["boxes"].to(anchors_per_image)
            inside = inside_anchors(anchors_per_image, size, self.allowed_border)
            label = torch.full((len(anchors_per_image),), -1.0, device=anchors_per_image.device)
            matched = anchors_per_image.new_zeros((len(anchors_per_image), 5))
            if len(gt) == 0:
                label[inside] = 0.0
            elif inside.any():  # mmdet gives up on an image without inside anchors; it trains on nothing here
                idx = self.proposal_matcher(self.box_similarity(obb_to_xyxy(gt), anchors_per_image[inside]))
                inner = (idx >= 0).to(label.dtype)
                inner[idx == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1.0
                label[inside] = inner
                matched[inside] = gt[idx.clamp(min=0)]
            labels.append(label)
            matched_boxes.append(matched)
        return labels, matched_boxes

    def compute_loss(  # type: ignore[override]
        self, objectness: Tensor, deltas: Tensor, labels: list[Tensor], anchors: list[Tensor], matched: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """mmdet ``AnchorHead.loss`` with ``OrientedRPNHead.loss_single``: sampled anchors, sums over ``avg_factor``.

        Args:
            objectness: ``[B, N]`` logits.
            deltas: ``[B, N, 6]`` predicted deltas.
            labels: Per image ``[N]`` (1 / 0 / -1) from :meth:`assign_targets_to_anchors`.
            anchors: Per image ``[N, 4]`` anchors.
            matched: Per image ``[N, 5]`` matched rotated ground truth.

        Returns:
            ``(loss_rpn_cls, loss_rpn_bbox)``.
        """
        pos_masks, neg_masks = self.fg_bg_sampler(labels)
        avg_factor = sum(max(int(p.sum()), 1) + max(int(n.sum()), 1) for p, n in zip(pos_masks, neg_masks))
        pos, neg = torch.cat(pos_masks).bool(), torch.cat(neg_masks).bool()
        sampled = pos | neg
        logits = objectness.reshape(-1).float()
        loss_cls = F.binary_cross_entropy_with_logits(logits[sampled], torch.cat(labels)[sampled], reduction="sum")
        targets = self.coder.encode(torch.cat(anchors)[pos], torch.cat(matched)[pos])
        loss_bbox = F.smooth_l1_loss(deltas.reshape(-1, 6)[pos].float(), targets, beta=1 / 9, reduction="sum")
        return loss_cls / avg_factor, loss_bbox / avg_factor

    @torch.no_grad()
    def filter_proposals(  # type: ignore[override]
        self, anchors: list[Tensor], objectness: Tensor, deltas: Tensor, num_anchors_per_level: list[int]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """mmrotate ``OrientedRPNHead._get_bboxes_single`` for each image.

        Per level the ``pre_nms_top_n`` best anchors (torchvision's ``_get_top_n_idx``), their deltas decoded
        to rotated boxes (not clipped: ``MidpointOffsetCoder.decode`` ignores ``max_shape``), boxes under
        ``min_size`` dropped, NMS on the circumscribed boxes per level (torchvision ``batched_nms``, as mmcv's),
        the best ``post_nms_top_n``.

        Args:
            anchors: Per image ``[N, 4]`` anchors, levels concatenated.
            objectness: ``[B, N]`` logits.
            deltas: ``[B, N, 6]`` deltas.
            num_anchors_per_level: Anchors of each level (per image).

        Returns:
            Per image the proposals ``[K, 5]`` (le90) and their sigmoid scores ``[K]``, by descending score.
        """
        objectness, deltas = objectness.detach().float(), deltas.detach().float()
        device = objectness.device
        levels = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(num_anchors_per_level)])
        top = self._get_top_n_idx(objectness, num_anchors_per_level)  # B, T
        boxes_out, scores_out = [], []
        for i, idx in enumerate(top):
            scores, level = objectness[i, idx].sigmoid(), levels[idx]
            boxes = self.coder.decode(anchors[i][idx].float(), deltas[i, idx])
            if self.min_size > 0:
                keep = (boxes[:, 2] >= self.min_size) & (boxes[:, 3] >= self.min_size)
                boxes, scores, level = boxes[keep], scores[keep], level[keep]
            keep = batched_nms(obb_to_xyxy(boxes), scores, level, self.nms_thresh)[: self.post_nms_top_n()]
            boxes_out.append(boxes[keep])
            scores_out.append(scores[keep])
        return boxes_out, scores_out


def _flatten(per_level: list[Tensor], channels: int) -> Tensor:
    """``[B, A * C, H, W]`` maps to ``[B, sum(H W A), C]``, position-major then anchor (mmdet's order)."""
    flat = [permute_and_flatten(x, len(x), x.shape[1] // channels, channels, *x.shape[-2:]) for x in per_level]
    return torch.cat(flat, dim=1)
