"""Cascade Mask R-CNN (Cai & Vasconcelos, "Cascade R-CNN: Delving into High Quality Object
Detection", CVPR 2018) assembled from torchvision's detection parts.

torchvision has no cascade; everything but the cascade loop itself is torchvision's:
``GeneralizedRCNN`` + ``GeneralizedRCNNTransform``, the ``RegionProposalNetwork``,
``MultiScaleRoIAlign``, ``BoxCoder``/``Matcher``/``BalancedPositiveNegativeSampler``,
``FastRCNNConvFCHead`` and the Mask R-CNN head, loss and inference. The defaults are the
release's configuration (Cascade Mask R-CNN, Swin, "4conv1fc" heads, GIoU loss)::

    stage t = 0, 1, 2:  IoU threshold 0.5 / 0.6 / 0.7, loss weight 1 / 0.5 / 0.25, 512 RoIs (1/4 positive),
                        class-agnostic deltas, target stds (0.1, 0.1, 0.2, 0.2) / (0.05, 0.05, 0.1, 0.1)
                        / (0.033, 0.033, 0.067, 0.067), GIoU loss x 10 on the decoded boxes
    training:  rois_t = sample(match_t(boxes_t + gt));  boxes_{t+1} = decode_t(rois_t)  (detached, no gt copies)
    inference: boxes_{t+1} = decode_t(boxes_t);  scores = mean_t softmax(logits_t(boxes_t));  boxes = boxes_3

Labels follow torchvision: 0 is the background, ``num_classes`` counts it.

Where this differs from the release (mmdetection 2.x's cascade head): one mask head, trained on
the last stage's positives (the release trains one per stage and averages them at test time);
the stages' softmax scores are averaged (the release averages logits, then takes the softmax:
``score_average="logits"``); the box heads' norm is BatchNorm2d, SyncBN's single-process form.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, boxes as box_ops, generalized_box_iou_loss

__all__ = [
    "RELEASE_TARGET_STDS",
    "RELEASE_BBOX_REG_WEIGHTS",
    "CascadeBoxPredictor",
    "CascadeStage",
    "CascadeRoIHeads",
    "CascadeMaskRCNN",
    "cascade_box_loss",
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

    As torchvision's ``fastrcnn_loss`` does for its smooth-L1, the box loss is summed over the
    positives and divided by the number of sampled RoIs.

    Args:
        class_logits: (R, num_classes) logits of the sampled RoIs of all images.
        box_deltas: (R, 4) class-agnostic deltas.
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
    pred = box_coder.decode_single(box_deltas[pos], rois[pos])
    loss_box = generalized_box_iou_loss(pred, matched_gt_boxes[pos], reduction="sum") / max(labels.numel(), 1)
    return loss_cls, box_loss_weight * loss_box


class CascadeBoxPredictor(nn.Module):
    """Classifier over ``num_classes`` (background included) and one class-agnostic box delta."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)  # Fast R-CNN's initialisation
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)  # (R, num_classes), (R, 4)


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
        # positives at IoU >= t, negatives below t: no ignored band, no low-quality matches
        self.proposal_matcher = Matcher(iou_threshold, iou_threshold, allow_low_quality_matches=False)
        self.box_coder = BoxCoder(bbox_reg_weights)

    def forward(self, box_features: Tensor) -> tuple[Tensor, Tensor]:
        return self.predictor(self.head(box_features))

    def refine(self, rois: list[Tensor], box_deltas: Tensor, image_shapes: list[tuple[int, int]]) -> list[Tensor]:
        """Decode the deltas onto the RoIs, clip to the image, detach: the next stage's boxes."""
        deltas = box_deltas.detach().split([len(r) for r in rois])
        return [box_ops.clip_boxes_to_image(self.box_coder.decode_single(d, r), s) for d, r, s in zip(deltas, rois, image_shapes)]


class CascadeRoIHeads(nn.Module):
    """The cascade of box stages and the mask head on the last stage; torchvision's ``RoIHeads`` contract.

    ``forward(features, proposals, image_shapes, targets)`` returns ``(detections, losses)``; the
    losses are ``loss_classifier_s{t}`` / ``loss_box_reg_s{t}`` (stage weight applied, ``t`` as in
    ``stages.t``) and ``loss_mask``.
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
        score_average: Literal["probs", "logits"] = "probs",
        mask_roi_pool: nn.Module | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if score_average not in ("probs", "logits"):
            raise ValueError(f"`score_average` must be 'probs' or 'logits', got {score_average!r}")
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
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor

    def has_mask(self) -> bool:
        return self.mask_roi_pool is not None and self.mask_head is not None and self.mask_predictor is not None

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

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        boxes = proposals
        losses: dict[str, Tensor] = {}
        stage_logits: list[Tensor] = []
        if self.training:
            targets = self._check_targets(targets)
        for t, stage in enumerate(self.stages):
            rois = boxes
            if self.training:
                rois, is_gt, matched, labels, matched_gt = self._sample(stage, boxes, targets)
            logits, deltas = stage(self.box_roi_pool(features, rois, image_shapes))
            if self.training:
                loss_cls, loss_box = cascade_box_loss(
                    logits, deltas, torch.cat(rois), torch.cat(labels), torch.cat(matched_gt),
                    stage.box_coder, self.box_loss_weight,
                )
                losses[f"loss_classifier_s{t}"] = stage.loss_weight * loss_cls
                losses[f"loss_box_reg_s{t}"] = stage.loss_weight * loss_box
            else:
                stage_logits.append(logits)
            boxes = stage.refine(rois, deltas, image_shapes)
            if self.training:  # the next stage gets the ground truth afresh, not its refined copies
                boxes = [b[~g] for b, g in zip(boxes, is_gt)]

        result: list[dict[str, Tensor]] = []
        if not self.training:
            if self.score_average == "probs":
                scores = torch.stack([F.softmax(s, -1) for s in stage_logits]).mean(0)
            else:
                scores = F.softmax(torch.stack(stage_logits).mean(0), -1)
            result = self.postprocess_detections(scores, boxes, image_shapes)

        if self.has_mask():
            if self.training:  # the last stage's positive RoIs (as sampled, before its refinement)
                pos = [torch.where(lab > 0)[0] for lab in labels]
                mask_rois = [r[p] for r, p in zip(rois, pos)]
                mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_rois, image_shapes)))
                losses["loss_mask"] = maskrcnn_loss(
                    mask_logits, mask_rois, [tg["masks"] for tg in targets], [tg["labels"] for tg in targets],
                    [m[p] for m, p in zip(matched, pos)],
                )
            else:
                mask_rois = [r["boxes"] for r in result]
                mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_rois, image_shapes)))
                for probs, r in zip(maskrcnn_inference(mask_logits, [r["labels"] for r in result]), result):
                    r["masks"] = probs  # (N, 1, 28, 28); the transform pastes them into the image
        return result, losses

    def postprocess_detections(
        self, scores: Tensor, boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """torchvision's ``RoIHeads.postprocess_detections`` for class probabilities and one box per RoI.

        Every (box, foreground class) pair is a candidate: score threshold, small-box removal,
        per-class NMS, the top ``detections_per_img``.
        """
        num_classes = scores.shape[-1]
        result = []
        for s, b, shape in zip(scores.split([len(x) for x in boxes]), boxes, image_shapes):
            b = box_ops.clip_boxes_to_image(b, shape)
            labels = torch.arange(1, num_classes, device=s.device).expand(len(b), -1).reshape(-1)
            b = b[:, None].expand(-1, num_classes - 1, -1).reshape(-1, 4)
            s = s[:, 1:].reshape(-1)
            keep = torch.where(s > self.score_thresh)[0]
            b, s, labels = b[keep], s[keep], labels[keep]
            keep = box_ops.remove_small_boxes(b, min_size=1e-2)
            b, s, labels = b[keep], s[keep], labels[keep]
            keep = box_ops.batched_nms(b, s, labels, self.nms_thresh)[: self.detections_per_img]
            result.append({"boxes": b[keep], "labels": labels[keep], "scores": s[keep]})
        return result


class CascadeMaskRCNN(GeneralizedRCNN):
    """Cascade Mask R-CNN with torchvision's ``MaskRCNN`` interface and the release's defaults.

    ``model(images, targets)`` in training returns the loss dict (``loss_objectness``,
    ``loss_rpn_box_reg``, ``loss_classifier_s{t}``, ``loss_box_reg_s{t}``, ``loss_mask``, each
    already weighted, so their sum is the loss); in eval ``model(images)`` returns per image
    ``boxes`` (FloatTensor[N, 4], x1, y1, x2, y2 in input pixels), ``labels`` (Int64Tensor[N]),
    ``scores`` (Tensor[N]) and ``masks`` (Tensor[N, 1, H, W], probabilities).

    Targets per image: ``boxes`` (FloatTensor[N, 4], x1, y1, x2, y2), ``labels``
    (Int64Tensor[N], 1..num_classes-1) and ``masks`` (UInt8Tensor[N, H, W]).

    Args:
        backbone: Module with an int ``out_channels`` returning an ordered dict of maps.
        num_classes: Classes *including* the background (torchvision's convention; COCO: 81).
        min_size, max_size, image_mean, image_std: ``GeneralizedRCNNTransform``'s.
        rpn_*: As torchvision's ``MaskRCNN``; the default anchors assume five levels.
        box_roi_pool: Defaults to ``MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)``.
        box_heads: One per stage; default "4conv1fc": ``FastRCNNConvFCHead`` with four 3x3 convs
            of ``head_channels`` (256), each with ``box_norm_layer``, and one fc of 1024.
        box_predictors: One per stage; default :class:`CascadeBoxPredictor` (class-agnostic boxes).
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
        score_average: ``"probs"`` averages the stages' softmax scores; ``"logits"`` averages the
            logits and then takes the softmax (what mmdetection 2.x's cascade head computes).
        mask_roi_pool, mask_head, mask_predictor: Default ``MultiScaleRoIAlign(..., 14, 2)``,
            ``MaskRCNNHeads`` (four ``head_channels`` convs) and ``MaskRCNNPredictor`` (28x28, one mask per class).

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
        rpn_anchor_generator: AnchorGenerator | None = None,
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
        score_average: Literal["probs", "logits"] = "probs",
        mask_roi_pool: nn.Module | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
    ) -> None:
        if not isinstance(getattr(backbone, "out_channels", None), int):
            raise TypeError(
                f"backbone must have an int `out_channels` (like torchvision's BackboneWithFPN), "
                f"got {getattr(backbone, 'out_channels', None)!r} on {type(backbone).__name__}"
            )
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"`num_classes` counts the background and must be an int >= 2, got {num_classes!r}")
        per_stage = dict(iou_thresholds=iou_thresholds, stage_loss_weights=stage_loss_weights, bbox_reg_weights=bbox_reg_weights)
        per_stage |= {k: v for k, v in (("box_heads", box_heads), ("box_predictors", box_predictors)) if v is not None}
        if wrong := {k: len(v) for k, v in per_stage.items() if len(v) != num_stages}:
            raise ValueError(f"per-stage options must have num_stages={num_stages} entries, got lengths {wrong}")
        channels = backbone.out_channels

        if rpn_anchor_generator is None:  # torchvision's default: one size per level, five levels
            rpn_anchor_generator = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
        if rpn_head is None:
            rpn_head = RPNHead(channels, rpn_anchor_generator.num_anchors_per_location()[0])
        rpn = RegionProposalNetwork(
            rpn_anchor_generator, rpn_head, rpn_fg_iou_thresh, rpn_bg_iou_thresh, rpn_batch_size_per_image,
            rpn_positive_fraction, dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
            dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test), rpn_nms_thresh,
            score_thresh=rpn_score_thresh,
        )

        if box_roi_pool is None:
            box_roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
        if box_heads is None:
            size = box_roi_pool.output_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            box_heads = [  # "4conv1fc"
                FastRCNNConvFCHead((channels, *size), [head_channels] * 4, [1024], norm_layer=box_norm_layer) for _ in range(num_stages)
            ]
        if box_predictors is None:
            box_predictors = [CascadeBoxPredictor(1024, num_classes) for _ in range(num_stages)]
        stages = [
            CascadeStage(h, p, iou_threshold=float(iou), bbox_reg_weights=tuple(map(float, w)), loss_weight=float(lw))
            for h, p, iou, w, lw in zip(box_heads, box_predictors, iou_thresholds, bbox_reg_weights, stage_loss_weights)
        ]

        if mask_roi_pool is None:
            mask_roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=14, sampling_ratio=2)
        if mask_head is None:
            mask_head = MaskRCNNHeads(channels, [head_channels] * 4, 1)
        if mask_predictor is None:
            mask_predictor = MaskRCNNPredictor(head_channels, head_channels, num_classes)

        roi_heads = CascadeRoIHeads(
            box_roi_pool, stages, num_classes=num_classes,
            batch_size_per_image=box_batch_size_per_image, positive_fraction=box_positive_fraction,
            box_loss_weight=box_loss_weight, score_thresh=box_score_thresh, nms_thresh=box_nms_thresh,
            detections_per_img=box_detections_per_img, score_average=score_average,
            mask_roi_pool=mask_roi_pool, mask_head=mask_head, mask_predictor=mask_predictor,
        )
        transform = GeneralizedRCNNTransform(
            min_size, max_size, image_mean or [0.485, 0.456, 0.406], image_std or [0.229, 0.224, 0.225]
        )
        super().__init__(backbone, rpn, roi_heads, transform)
        self.num_classes = num_classes
