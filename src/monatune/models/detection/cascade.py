"""Cascade Mask R-CNN (Cai & Vasconcelos, "Cascade R-CNN: Delving into High Quality Object
Detection", CVPR 2018) as the release's mmdetection 2.11 ``CascadeRoIHead`` computes it, on torchvision's parts.

torchvision has no cascade. ``GeneralizedRCNN``, the transform, the RPN, ``BoxCoder``/``Matcher``/
``BalancedPositiveNegativeSampler``, ``FastRCNNConvFCHead`` and the Mask R-CNN head modules are
torchvision's; the RoI pooling, mask targets and mask pasting are mmdetection's (:mod:`.roi`). The
defaults are the release's configuration (Cascade Mask R-CNN, Swin, "4conv1fc" heads, GIoU loss)::

    stage t = 0, 1, 2:  IoU threshold 0.5 / 0.6 / 0.7, loss weight 1 / 0.5 / 0.25, 512 RoIs (1/4 positive),
                        class-specific deltas (4 x 80 on COCO), target stds (0.1, 0.1, 0.2, 0.2) /
                        (0.05, 0.05, 0.1, 0.1) / (0.033, 0.033, 0.067, 0.067), GIoU loss x 10 on the decoded
                        boxes, a mask head trained on the stage's positives
    training:  rois_t = sample(match_t(boxes_t + gt));  boxes_{t+1} = decode_t(rois_t, class)  (gt class for
               positives, best foreground class for negatives; detached, gt copies removed)
    inference: boxes_{t+1} = decode_t(boxes_t, predicted class);  scores = softmax(mean_t logits_t(boxes_t));
               boxes = the last stage's per-class boxes -> per-class NMS;  masks = mean_t sigmoid(mask_t(boxes)) >= 0.5

Labels follow torchvision: 0 is the background, ``num_classes`` counts it; the box and mask
outputs cover the foreground classes only, as mmdetection's.

Where this still differs from the release: the box heads' norm is BatchNorm2d (SyncBN when the
trainer's ``sync_batchnorm`` is on, as the paper configs set it).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import boxes as box_ops, generalized_box_iou_loss

from .anchors import MMDetAnchorGenerator
from .assign import MaxIoUAssigner
from .roi import LevelRoIAlign, mask_targets
from .rpn import BorderRPN
from .transform import MMDetTransform

__all__ = [
    "RELEASE_TARGET_STDS",
    "RELEASE_BBOX_REG_WEIGHTS",
    "CascadeBoxPredictor",
    "CascadeMaskHead",
    "CascadeStage",
    "CascadeRoIHeads",
    "CascadeMaskRCNN",
    "cascade_box_loss",
    "class_deltas",
]

# The release's per-stage regression target stds (means 0); torchvision's BoxCoder takes 1 / std.
RELEASE_TARGET_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
RELEASE_BBOX_REG_WEIGHTS = tuple(tuple(1.0 / s for s in stds) for stds in RELEASE_TARGET_STDS)
# = (10, 10, 5, 5), (20, 20, 10, 10), (30.303..., 30.303..., 14.925..., 14.925...)


def cascade_box_loss(
    class_logits: Tensor,
    box_deltas: Tensor,
    rois: Tensor,
    labels: Tensor,
    matched_gt_boxes: Tensor,
    box_coder: BoxCoder,
    box_loss_weight: float = 10.0,
) -> tuple[Tensor, Tensor]:
    """One stage's losses: cross-entropy, and GIoU on the decoded boxes of the positive RoIs.

    As mmdetection 2.x's ``BBoxHead.loss`` (and torchvision's ``fastrcnn_loss``), both are averaged
    over the sampled RoIs of the batch: the box loss is summed over the positives and divided by
    the number of sampled RoIs.

    Args:
        class_logits: (R, num_classes) logits of the sampled RoIs of all images.
        box_deltas: (R, 4) class-agnostic deltas, or (R, 4 * (num_classes - 1)) class-specific ones
            (those of each positive's ground-truth class are used).
        rois: (R, 4) the boxes the deltas apply to, x1, y1, x2, y2.
        labels: (R,) int64, 0 for background.
        matched_gt_boxes: (R, 4) the ground truth each RoI was matched to (ignored for background).
        box_coder: The stage's coder.
        box_loss_weight: Factor on the GIoU loss (the release's cascade heads use 10).

    Returns:
        ``(loss_classifier, loss_box_reg)``.
    """
    loss_cls = F.cross_entropy(class_logits, labels)
    pos = torch.where(labels > 0)[0]
    deltas = class_deltas(box_deltas[pos], labels[pos])
    pred = box_coder.decode_single(deltas, rois[pos])
    loss_box = generalized_box_iou_loss(pred, matched_gt_boxes[pos], reduction="sum") / max(labels.numel(), 1)
    return loss_cls, box_loss_weight * loss_box


def class_deltas(box_deltas: Tensor, labels: Tensor) -> Tensor:
    """Each RoI's (4,) deltas for its label (1-based; 0 is the background, never asked for).

    Class-agnostic deltas (R, 4) are returned as they are; class-specific ones (R, 4 * K) are laid out
    class after class, foreground classes only, as mmdetection's ``reg_class_agnostic=False``.
    """
    if box_deltas.shape[-1] == 4:
        return box_deltas
    return box_deltas.reshape(len(box_deltas), -1, 4)[torch.arange(len(box_deltas), device=box_deltas.device), labels - 1]


class CascadeBoxPredictor(nn.Module):
    """Classifier over ``num_classes`` (background included) and box deltas.

    Args:
        in_channels: Width of the box head's output.
        num_classes: Classes including the background (label 0).
        class_agnostic: One (4,) delta per RoI instead of one per foreground class. The release's
            Cascade Mask R-CNN regresses per class (``reg_class_agnostic=False``): 4 x 80 outputs on COCO.
    """

    def __init__(self, in_channels: int, num_classes: int, *, class_agnostic: bool = False) -> None:
        super().__init__()
        self.class_agnostic = class_agnostic
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4 if class_agnostic else 4 * (num_classes - 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)  # mmdetection's BBoxHead initialisation
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)  # (R, num_classes), (R, 4) or (R, 4 * (num_classes - 1))


class CascadeMaskHead(nn.Module):
    """mmdetection's ``FCNMaskHead``: convolutions, a 2x transposed convolution, one mask per foreground class.

    Built from torchvision's ``MaskRCNNHeads`` (``convs``) and ``MaskRCNNPredictor`` (``predictor``),
    whose initialisation (Kaiming normal, fan-out) is mmdetection's. The logits have
    ``num_classes - 1`` channels: no background mask.
    """

    def __init__(self, in_channels: int, num_classes: int, *, channels: int = 256, num_convs: int = 4) -> None:
        super().__init__()
        self.convs = MaskRCNNHeads(in_channels, [channels] * num_convs, 1)
        self.predictor = MaskRCNNPredictor(channels, channels, num_classes - 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictor(self.convs(x))  # (R, num_classes - 1, 2h, 2w) logits


class CascadeStage(nn.Module):
    """One cascade stage: box head and predictor, with its own matcher and box coder."""

    def __init__(
        self,
        head: nn.Module,
        predictor: nn.Module,
        *,
        iou_threshold: float,
        bbox_reg_weights: tuple[float, float, float, float],
        loss_weight: float,
    ) -> None:
        super().__init__()
        self.head = head
        self.predictor = predictor
        self.iou_threshold = iou_threshold
        self.loss_weight = loss_weight
        # positives at IoU >= t, negatives below t: no ignored band, no low-quality matches (mmdet's
        # MaxIoUAssigner with pos_iou_thr = neg_iou_thr = min_pos_iou = t, match_low_quality=False)
        self.proposal_matcher = Matcher(iou_threshold, iou_threshold, allow_low_quality_matches=False)
        self.box_coder = BoxCoder(bbox_reg_weights)

    def forward(self, box_features: Tensor) -> tuple[Tensor, Tensor]:
        return self.predictor(self.head(box_features))

    def refine(
        self, rois: list[Tensor], box_deltas: Tensor, labels: Tensor, image_shapes: list[tuple[int, int]]
    ) -> list[Tensor]:
        """Decode each RoI's deltas for ``labels`` (mmdet's ``regress_by_class``), clip to the image, detach."""
        deltas = class_deltas(box_deltas.detach(), labels).split([len(r) for r in rois])
        return [box_ops.clip_boxes_to_image(self.box_coder.decode_single(d, r), s) for d, r, s in zip(deltas, rois, image_shapes)]


class CascadeRoIHeads(nn.Module):
    """The cascade of box stages, each with its mask head; torchvision's ``RoIHeads`` contract.

    ``forward(features, proposals, image_shapes, targets)`` returns ``(detections, losses)``; the
    losses are ``loss_classifier_s{t}`` / ``loss_box_reg_s{t}`` / ``loss_mask_s{t}`` (stage weight
    applied, ``t`` as in ``stages.t``).
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        stages: Sequence[CascadeStage],
        *,
        num_classes: int,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        box_loss_weight: float = 10.0,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        score_average: Literal["probs", "logits"] = "logits",
        mask_roi_pool: nn.Module | None = None,
        mask_heads: Sequence[nn.Module] | None = None,
        mask_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        if score_average not in ("probs", "logits"):
            raise ValueError(f"`score_average` must be 'probs' or 'logits', got {score_average!r}")
        if mask_heads is not None and len(mask_heads) != len(stages):
            raise ValueError(f"one mask head per stage: got {len(mask_heads)} for {len(stages)} stages")
        self.box_roi_pool = box_roi_pool
        self.stages = nn.ModuleList(stages)
        self.num_classes = num_classes
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_loss_weight = box_loss_weight
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.score_average = score_average
        self.mask_roi_pool = mask_roi_pool
        self.mask_heads = nn.ModuleList(mask_heads) if mask_heads is not None else None
        self.mask_threshold = mask_threshold

    def has_mask(self) -> bool:
        return self.mask_roi_pool is not None and self.mask_heads is not None

    def _check_targets(self, targets: list[dict[str, Tensor]] | None) -> list[dict[str, Tensor]]:
        num_classes = self.num_classes
        if targets is None:
            raise ValueError("targets are required in training mode; call model.eval() for inference")
        for i, t in enumerate(targets):
            keys = {"boxes", "labels"} | ({"masks"} if self.has_mask() else set())
            if missing := keys - set(t):
                raise ValueError(f"target {i} lacks {sorted(missing)}; it has {sorted(t)}")
            labels = t["labels"]
            if labels.dtype != torch.int64:
                raise TypeError(f"target {i}: labels must be int64, got {labels.dtype}")
            if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) >= num_classes):
                raise ValueError(
                    f"target {i}: labels must lie in 1..{num_classes - 1} (0 is the background), got {labels.tolist()}"
                )
        return targets

    def _sample(
        self, stage: CascadeStage, boxes: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Add the ground truth to ``boxes``, match at the stage's IoU and sample.

        Returns per image: RoIs, whether each is a ground-truth copy, matched gt index, label, matched gt box.
        """
        rois, is_gt, matched, labels = [], [], [], []
        for b, t in zip(boxes, targets):
            gt = t["boxes"].to(b.dtype)
            r = torch.cat([b, gt])
            g = torch.arange(len(r), device=b.device) >= len(b)  # the ground-truth copies come last
            if gt.numel() == 0:
                m = torch.zeros(len(r), dtype=torch.int64, device=b.device)
                lab = torch.zeros(len(r), dtype=torch.int64, device=b.device)
            else:
                idx = stage.proposal_matcher(box_ops.box_iou(gt, r))
                m = idx.clamp(min=0)
                lab = t["labels"][m].clone()
                lab[idx == Matcher.BELOW_LOW_THRESHOLD] = 0
                lab[idx == Matcher.BETWEEN_THRESHOLDS] = -1  # ignored by the sampler
            rois.append(r)
            is_gt.append(g)
            matched.append(m)
            labels.append(lab)
        pos, neg = self.fg_bg_sampler(labels)
        keep = [torch.where(p | n)[0] for p, n in zip(pos, neg)]
        rois, is_gt, matched, labels = ([x[k] for x, k in zip(xs, keep)] for xs in (rois, is_gt, matched, labels))
        gt_boxes = [t["boxes"].to(r.dtype) if t["boxes"].numel() else r.new_zeros(1, 4) for t, r in zip(targets, rois)]
        return rois, is_gt, matched, labels, [g[m] for g, m in zip(gt_boxes, matched)]

    def _mask_loss(
        self, t: int, features: dict[str, Tensor], rois: list[Tensor], labels: list[Tensor], matched: list[Tensor],
        targets: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """Stage ``t``'s mask loss on its positive RoIs (as sampled, before refinement), mmdet's FCNMaskHead loss:
        binary cross-entropy of the gt class's logits against binarised targets, averaged over every pixel."""
        pos = [torch.where(lab > 0)[0] for lab in labels]
        pos_rois = [r[p] for r, p in zip(rois, pos)]
        logits = self.mask_heads[t](self.mask_roi_pool(features, pos_rois, image_shapes))
        if logits.shape[0] == 0:
            return logits.sum() * 0.0  # keeps every mask parameter in the graph
        size = logits.shape[-1]
        goal = torch.cat([
            mask_targets(tg["masks"], r, m[p], size) for tg, r, m, p in zip(targets, pos_rois, matched, pos)
        ])
        pos_labels = torch.cat([lab[p] for lab, p in zip(labels, pos)])
        logits = logits[torch.arange(len(logits), device=logits.device), pos_labels - 1]
        return F.binary_cross_entropy_with_logits(logits, goal.to(logits.dtype))

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            return [], self._forward_train(features, proposals, image_shapes, self._check_targets(targets))
        return self._forward_test(features, proposals, image_shapes), {}

    def _forward_train(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """mmdet 2.x ``CascadeRoIHead.forward_train``: per stage sample, box and mask losses, refine."""
        boxes = proposals
        losses: dict[str, Tensor] = {}
        last = len(self.stages) - 1
        for t, stage in enumerate(self.stages):
            rois, is_gt, matched, labels, matched_gt = self._sample(stage, boxes, targets)
            logits, deltas = stage(self.box_roi_pool(features, rois, image_shapes))
            loss_cls, loss_box = cascade_box_loss(
                logits, deltas, torch.cat(rois), torch.cat(labels), torch.cat(matched_gt), stage.box_coder, self.box_loss_weight,
            )
            losses[f"loss_classifier_s{t}"] = stage.loss_weight * loss_cls
            losses[f"loss_box_reg_s{t}"] = stage.loss_weight * loss_box
            if self.has_mask():
                mask_loss = self._mask_loss(t, features, rois, labels, matched, targets, image_shapes)
                losses[f"loss_mask_s{t}"] = stage.loss_weight * mask_loss
            if t < last:
                # positives refine with their gt class's deltas, negatives with their best foreground class
                lab = torch.cat(labels)
                lab = torch.where(lab > 0, lab, logits.detach()[:, 1:].argmax(1) + 1)
                refined = stage.refine(rois, deltas, lab, image_shapes)
                boxes = [b[~g] for b, g in zip(refined, is_gt)]  # the next stage gets the ground truth afresh
        return losses

    def _forward_test(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """mmdet 2.x ``CascadeRoIHead.simple_test``: refine by the predicted class, average the stages' scores,
        per-class boxes of the last stage, masks of every stage averaged on the final boxes."""
        rois = proposals
        stage_logits: list[Tensor] = []
        last = len(self.stages) - 1
        for t, stage in enumerate(self.stages):
            logits, deltas = stage(self.box_roi_pool(features, rois, image_shapes))
            stage_logits.append(logits)
            if t < last:
                rois = stage.refine(rois, deltas, logits[:, 1:].argmax(1) + 1, image_shapes)
        if self.score_average == "probs":
            scores = torch.stack([F.softmax(s, -1) for s in stage_logits]).mean(0)
        else:  # mmdetection: the logits are averaged, then the softmax
            scores = F.softmax(torch.stack(stage_logits).mean(0), -1)
        result = self.postprocess_detections(scores, deltas, rois, self.stages[-1].box_coder, image_shapes)
        if self.has_mask():
            boxes = [r["boxes"] for r in result]
            pooled = self.mask_roi_pool(features, boxes, image_shapes)
            probs = torch.stack([head(pooled).sigmoid() for head in self.mask_heads]).mean(0)  # mmdet's merge_aug_masks
            labels = torch.cat([r["labels"] for r in result])
            probs = probs[torch.arange(len(probs), device=probs.device), labels - 1][:, None]
            for p, r in zip(probs.split([len(b) for b in boxes]), result):
                r["masks"] = p  # (N, 1, 28, 28) probabilities; the transform pastes them into the image
        return result

    def postprocess_detections(
        self, scores: Tensor, box_deltas: Tensor, rois: list[Tensor], box_coder: BoxCoder, image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """mmdet 2.x ``BBoxHead.get_bboxes`` + ``multiclass_nms``.

        Every (RoI, foreground class) pair is a candidate with that class's box (class-specific
        deltas) or the shared one: clip to the image, keep scores above ``score_thresh``, NMS per
        class, the top ``detections_per_img``. No small-box removal (torchvision's ``RoIHeads``
        drops boxes under 0.01 px; mmdetection does not).
        """
        num_classes = scores.shape[-1]
        result = []
        sizes = [len(r) for r in rois]
        for s, d, r, shape in zip(scores.split(sizes), box_deltas.split(sizes), rois, image_shapes):
            if d.shape[-1] == 4:  # class-agnostic: one box for every class
                d = d.repeat(1, num_classes - 1)
            b = box_ops.clip_boxes_to_image(box_coder.decode_single(d, r).reshape(len(r), -1, 4), shape).reshape(-1, 4)
            labels = torch.arange(1, num_classes, device=s.device).expand(len(r), -1).reshape(-1)
            s = s[:, 1:].reshape(-1)
            keep = torch.where(s > self.score_thresh)[0]
            b, s, labels = b[keep], s[keep], labels[keep]
            keep = box_ops.batched_nms(b, s, labels, self.nms_thresh)[: self.detections_per_img]
            result.append({"boxes": b[keep], "labels": labels[keep], "scores": s[keep]})
        return result


class CascadeMaskRCNN(GeneralizedRCNN):
    """Cascade Mask R-CNN with torchvision's ``MaskRCNN`` interface and the release's defaults.

    ``model(images, targets)`` in training returns the loss dict (``loss_objectness``,
    ``loss_rpn_box_reg``, ``loss_classifier_s{t}``, ``loss_box_reg_s{t}``, ``loss_mask_s{t}``, each
    already weighted, so their sum is the loss); in eval ``model(images)`` returns per image
    ``boxes`` (FloatTensor[N, 4], x1, y1, x2, y2 in input pixels), ``labels`` (Int64Tensor[N]),
    ``scores`` (Tensor[N]) and ``masks`` (Tensor[N, 1, H, W], the stages' averaged probabilities,
    pasted as mmdetection does; a pixel is in the mask at >= 0.5).

    Targets per image: ``boxes`` (FloatTensor[N, 4], x1, y1, x2, y2), ``labels``
    (Int64Tensor[N], 1..num_classes-1) and ``masks`` (UInt8Tensor[N, H, W]).

    Args:
        backbone: Module with an int ``out_channels`` returning an ordered dict of maps.
        num_classes: Classes *including* the background (torchvision's convention; COCO: 81).
        min_size, max_size, image_mean, image_std: ``GeneralizedRCNNTransform``'s.
        rpn_*: As torchvision's ``MaskRCNN``; the default anchors (mmdet's: scale 8 of strides 4-64,
            ratios 0.5 / 1 / 2, not rounded) assume five levels. Anchors are assigned by mmdet's
            ``MaxIoUAssigner`` (positive at IoU >= 0.7, negative below 0.3, a ground truth's best
            anchors positive when their IoU is at least ``rpn_min_pos_iou``).
            ``rpn_allowed_border``: anchors crossing the image border by more than this many pixels
            take no part in training (the release: 0; negative: all anchors train).
        box_roi_pool: Defaults to mmdet's ``SingleRoIExtractor``: :class:`~.roi.LevelRoIAlign` over maps
            ``"0"``-``"3"`` (strides 4-32), 7 x 7, aligned, adaptive sampling.
        box_heads: One per stage; default "4conv1fc": ``FastRCNNConvFCHead`` with four 3x3 convs
            of ``head_channels`` (256), each with ``box_norm_layer``, and one fc of 1024.
        box_predictors: One per stage; default :class:`CascadeBoxPredictor`, class-specific boxes
            unless ``class_agnostic``.
        class_agnostic: Default predictors regress one box per RoI instead of one per class (the
            release: per class).
        box_norm_layer: Norm in the default box heads; the release uses SyncBN, BatchNorm2d is its
            single-process equivalent and keeps the same state (torchvision's v2 heads use it too).
        head_channels: Width of the default box heads' and mask head's convolutions (the release: 256).
        box_score_thresh, box_nms_thresh, box_detections_per_img: Inference postprocessing.
        box_batch_size_per_image, box_positive_fraction: RoI sampling, per stage.
        box_loss_weight: Factor on each stage's GIoU loss (the release: 10).
        iou_thresholds: Per stage; RoIs at or above are positives, below are negatives.
        stage_loss_weights: Per stage factor on its classification and box losses.
        bbox_reg_weights: Per stage ``BoxCoder`` weights, 1 / the release's target stds.
        num_stages: Number of stages; the per-stage sequences must have this length.
        score_average: ``"logits"`` (default, mmdetection 2.x's cascade head) averages the stages'
            logits and then takes the softmax; ``"probs"`` averages their softmax scores.
        mask_roi_pool: Default :class:`~.roi.LevelRoIAlign` 14 x 14.
        mask_heads: One per stage; default :class:`CascadeMaskHead` (four ``head_channels`` convs,
            28 x 28, one mask per foreground class). Pass ``None`` via ``with_masks=False`` for boxes only.
        with_masks: Build the mask branch (Cascade Mask R-CNN) or not (Cascade R-CNN).

    Example:
        >>> from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
        >>> backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
        >>> model = CascadeMaskRCNN(backbone, num_classes=81).eval()
        >>> detections = model([torch.rand(3, 320, 480)])
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        min_size: int | tuple[int, ...] = 800,
        max_size: int = 1333,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        rpn_anchor_generator: nn.Module | None = None,
        rpn_head: nn.Module | None = None,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_fg_iou_thresh: float = 0.7,
        rpn_bg_iou_thresh: float = 0.3,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_score_thresh: float = 0.0,
        rpn_allowed_border: float = 0.0,
        rpn_min_pos_iou: float = 0.3,
        box_roi_pool: nn.Module | None = None,
        box_heads: Sequence[nn.Module] | None = None,
        box_predictors: Sequence[nn.Module] | None = None,
        box_norm_layer: Callable[..., nn.Module] | None = nn.BatchNorm2d,
        head_channels: int = 256,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        box_loss_weight: float = 10.0,
        num_stages: int = 3,
        iou_thresholds: Sequence[float] = (0.5, 0.6, 0.7),
        stage_loss_weights: Sequence[float] = (1.0, 0.5, 0.25),
        bbox_reg_weights: Sequence[tuple[float, float, float, float]] = RELEASE_BBOX_REG_WEIGHTS,
        score_average: Literal["probs", "logits"] = "logits",
        class_agnostic: bool = False,
        mask_roi_pool: nn.Module | None = None,
        mask_heads: Sequence[nn.Module] | None = None,
        with_masks: bool = True,
    ) -> None:
        if not isinstance(getattr(backbone, "out_channels", None), int):
            raise TypeError(
                f"backbone must have an int `out_channels` (like torchvision's BackboneWithFPN), "
                f"got {getattr(backbone, 'out_channels', None)!r} on {type(backbone).__name__}"
            )
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"`num_classes` counts the background and must be an int >= 2, got {num_classes!r}")
        per_stage = dict(iou_thresholds=iou_thresholds, stage_loss_weights=stage_loss_weights, bbox_reg_weights=bbox_reg_weights)
        per_stage |= {k: v for k, v in (("box_heads", box_heads), ("box_predictors", box_predictors), ("mask_heads", mask_heads)) if v is not None}
        if wrong := {k: len(v) for k, v in per_stage.items() if len(v) != num_stages}:
            raise ValueError(f"per-stage options must have num_stages={num_stages} entries, got lengths {wrong}")
        channels = backbone.out_channels

        if rpn_anchor_generator is None:  # the release's: scale 8 of strides 4-64, ratios 0.5 / 1 / 2, unrounded
            rpn_anchor_generator = MMDetAnchorGenerator((4, 8, 16, 32, 64), (0.5, 1.0, 2.0), scales=(8,))
        if rpn_head is None:
            rpn_head = RPNHead(channels, rpn_anchor_generator.num_anchors_per_location()[0])
        rpn = BorderRPN(
            rpn_anchor_generator, rpn_head, rpn_fg_iou_thresh, rpn_bg_iou_thresh, rpn_batch_size_per_image,
            rpn_positive_fraction, dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
            dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test), rpn_nms_thresh,
            score_thresh=rpn_score_thresh, allowed_border=rpn_allowed_border,
        )
        # mmdet's MaxIoUAssigner: low-quality matches need IoU >= 0.3 (min_pos_iou) and go to the gt they are best for
        rpn.proposal_matcher = MaxIoUAssigner(rpn_fg_iou_thresh, rpn_bg_iou_thresh, min_pos_iou=rpn_min_pos_iou)

        if box_roi_pool is None:
            box_roi_pool = LevelRoIAlign(["0", "1", "2", "3"], 7)
        if box_heads is None:
            size = box_roi_pool.output_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            box_heads = [  # "4conv1fc"
                FastRCNNConvFCHead((channels, *size), [head_channels] * 4, [1024], norm_layer=box_norm_layer) for _ in range(num_stages)
            ]
            for head in box_heads:  # mmdet's ConvFCBBoxHead: Xavier-uniform fc, zero bias (torchvision keeps nn.Linear's)
                for fc in (m for m in head.modules() if isinstance(m, nn.Linear)):
                    nn.init.xavier_uniform_(fc.weight)
                    nn.init.zeros_(fc.bias)
        if box_predictors is None:
            box_predictors = [CascadeBoxPredictor(1024, num_classes, class_agnostic=class_agnostic) for _ in range(num_stages)]
        stages = [
            CascadeStage(h, p, iou_threshold=float(iou), bbox_reg_weights=tuple(map(float, w)), loss_weight=float(lw))
            for h, p, iou, w, lw in zip(box_heads, box_predictors, iou_thresholds, bbox_reg_weights, stage_loss_weights)
        ]

        if not with_masks:
            mask_roi_pool, mask_heads = None, None
        else:
            if mask_roi_pool is None:
                mask_roi_pool = LevelRoIAlign(["0", "1", "2", "3"], 14)
            if mask_heads is None:
                mask_heads = [CascadeMaskHead(channels, num_classes, channels=head_channels) for _ in range(num_stages)]

        roi_heads = CascadeRoIHeads(
            box_roi_pool, stages, num_classes=num_classes,
            batch_size_per_image=box_batch_size_per_image, positive_fraction=box_positive_fraction,
            box_loss_weight=box_loss_weight, score_thresh=box_score_thresh, nms_thresh=box_nms_thresh,
            detections_per_img=box_detections_per_img, score_average=score_average,
            mask_roi_pool=mask_roi_pool, mask_heads=mask_heads,
        )
        transform = MMDetTransform(
            min_size, max_size, image_mean or [0.485, 0.456, 0.406], image_std or [0.229, 0.224, 0.225]
        )
        super().__init__(backbone, rpn, roi_heads, transform)
        self.num_classes = num_classes
