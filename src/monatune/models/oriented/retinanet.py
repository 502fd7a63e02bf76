"""Rotated RetinaNet (Lin et al., ICCV 2017, with rotated boxes as mmrotate's ``RotatedRetinaNet``) as the
STAR/Mona release's ``configs/rotated_retinanet/peft/rotated_retinanet_{obb,hbb}_swin-b_mona_fpn_1x_star_oc.py``
and ``configs/kld/peft/rotated_retinanet_hbb_kld_swin-b_mona_fpn_1x_star_oc.py`` train and run it.

Network: the dense Swin's stages 1-3 (strides 8-32, each through its output norm) or a ViT's simple pyramid;
FPN to 256 channels with P6 = conv(C5) and P7 = conv(P6), no ReLU between (mmdet ``add_extra_convs="on_input"``,
:class:`~monatune.models.detection.builders.FeatureBackbone` ``extra="p6p7"``); :class:`RotatedRetinaHead`: two
towers of four (3x3 conv, ReLU), then 9 x K class logits and 9 x 5 deltas per position, every conv drawn from
N(0, 0.01) with zero bias, the class bias at the 0.01 prior (mmdet ``RetinaHead``'s ``init_cfg``).

Boxes inside are mmrotate's ``oc`` (``a`` in (0, pi/2], w and h as that angle gives them: the release's STAR data
for these configs is loaded with ``version='oc'``); ground truth arrives in le90 and is converted with
:func:`~.coders.le90_to_oc`, detections are returned in le90 (:func:`~.coders.oc_to_le90`).

- Anchors (``RotatedAnchorGenerator``): mmdet's anchors (octave base 4, 3 scales per octave, ratios 1, 0.5, 2 in
  that order, strides 8-128, centre offset 0) as ``(cx, cy, w, h, 0)``, from
  :class:`~monatune.models.detection.anchors.MMDetAnchorGenerator`. Anchors over another image's padding in the
  batch take no part in training (``valid_flags``; ``allowed_border=-1`` adds no border test).
- Assignment (mmdet ``MaxIoUAssigner`` 0.5 / 0.4, ``min_pos_iou`` 0, ``gt_max_assign_all``; ``PseudoSampler``)
  with the rotated IoU of the 'oc' ground truth and the anchors (mmrotate ``RBboxOverlaps2D``; here torchvision's
  rotated kernel, :func:`monatune.ops.rotated_box_iou`, which reads any ``(cx, cy, w, h, a)`` rectangle), or, with
  ``assign_by_circumhbbox`` (the release's hbb and KLD configs, ``assign_by_circumhbbox='oc'``), the IoU of
  each ground truth's circumscribed box, mmrotate ``obb2hbb_oc``: ``(cx, cy, sin a w + cos a h, cos a w + sin a h,
  pi/2)`` from the 'oc' box, with the anchors. Both are axis-aligned, so that IoU is computed here exactly by
  torchvision's ``box_iou``. The regression targets are the rotated ground truth either way.
- Losses (mmdet ``AnchorHead.loss``): sigmoid focal loss (gamma 2, alpha 0.25, torchvision's) over the positives
  and negatives, and L1 on the ``oc`` deltas (:class:`~.coders.DeltaXYWHACoder`, stds 1, no edge swap, no
  projection) of the positives, each summed over the batch and divided by ``avg_factor + eps`` where
  ``avg_factor`` is the sum over the images of ``max(positives of the image, 1)`` (``get_targets``), not
  averaged over processes. ``box_loss="kld"`` (``reg_decoded_bbox=True`` + ``GDLoss_v1``) decodes the positives'
  deltas and compares the boxes with :func:`~.gaussian.kld_loss`, averaged per FPN level and summed over the
  levels, with no ``avg_factor`` (:func:`~.gaussian.kld_level_loss` says why). The losses run in float32 (the
  release's ``force_fp32``).
- Inference (``RotatedAnchorHead._get_bboxes_single`` + ``multiclass_nms_rotated``): per level the ``nms_pre``
  anchors with the highest best-class sigmoid score, decoded with their centres clamped to the image
  (``max_shape``); boxes mapped back to the input's pixels when ``test_size`` resized it; every (anchor, class)
  whose score is above ``score_threshold``, per-class rotated NMS at IoU > ``nms_iou``
  (:func:`monatune.ops.batched_rotated_nms`: torchvision has no rotated NMS), the best ``max_per_image``.

Differences from the release, all at float-rounding level: base anchors computed by torchvision's generator in
another order of float32 products (an ulp apart); IoUs from torchvision's rotated kernel instead of mmcv's, without
mmcv's clamp of w, h to at least 1e-3, and the circumscribed-box IoU computed axis-aligned; per-class NMS by
separate greedy passes instead of mmcv's coordinate-offset trick.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou, sigmoid_focal_loss

from ...ops import batched_rotated_nms, rotated_box_iou
from ..detection.anchors import MMDetAnchorGenerator
from ..detection.assign import MaxIoUAssigner
from .coders import DeltaXYWHACoder, le90_to_oc, oc_to_le90
from .gaussian import kld_level_loss
from .common import check_build_args, checked_targets, feature_backbone, resize_for_test
from .losses import AVG_EPS
from .views import batch_images

__all__ = ["BOX_LOSSES", "STRIDES", "RATIOS", "RotatedRetinaHead", "RotatedRetinaNet", "build_rotated_retinanet",
           "circumscribed_xyxy", "rotated_anchor_generator"]  # fmt: skip

BOX_LOSSES = ("l1", "kld")
STRIDES = (8, 16, 32, 64, 128)
RATIOS = (1.0, 0.5, 2.0)  # RotatedAnchorGenerator's order in the release's configs


class ConvReLU(nn.Module):
    """3x3 conv with bias and ReLU: mmcv's ``ConvModule`` without a norm (same parameter names)."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.conv(x))


class RotatedRetinaHead(nn.Module):
    """mmrotate ``RotatedRetinaHead``: class logits ``[B, A K, H, W]`` and deltas ``[B, A 5, H, W]`` per level.

    Parameter names are the release's (``cls_convs.0.conv``, ``reg_convs.3.conv``, ``retina_cls``,
    ``retina_reg``), so its ``bbox_head.*`` weights load by name. torchvision's ``RetinaNetHead`` regresses 4
    values per anchor and initialises its towers differently, so the head is written here.

    Args:
        num_classes: K (sigmoid classes, no background channel).
        in_channels: Width of the FPN maps.
        feat_channels: Width of the towers.
        stacked_convs: Convs per tower.
        num_anchors: Anchors per position (9).
        prior_prob: The initial foreground probability of every class logit (0.01).
    """

    def __init__(self, num_classes: int, in_channels: int, *, feat_channels: int = 256, stacked_convs: int = 4,
                 num_anchors: int = 9, prior_prob: float = 0.01) -> None:  # fmt: skip
        super().__init__()
        self.num_classes, self.num_anchors = int(num_classes), int(num_anchors)
        self.cls_convs = nn.Sequential(*[ConvReLU(in_channels if i == 0 else feat_channels, feat_channels)
                                         for i in range(stacked_convs)])  # fmt: skip
        self.reg_convs = nn.Sequential(*[ConvReLU(in_channels if i == 0 else feat_channels, feat_channels)
                                         for i in range(stacked_convs)])  # fmt: skip
        self.retina_cls = nn.Conv2d(feat_channels, self.num_anchors * self.num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(feat_channels, self.num_anchors * 5, 3, padding=1)
        for conv in (m for m in self.modules() if isinstance(m, nn.Conv2d)):  # init_cfg Normal(std=0.01), Conv2d
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.retina_cls.bias, -math.log((1 - prior_prob) / prior_prob))  # override bias_prob

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        cls_scores = [self.retina_cls(self.cls_convs(x)) for x in features]
        bbox_preds = [self.retina_reg(self.reg_convs(x)) for x in features]
        return cls_scores, bbox_preds


def rotated_anchor_generator(strides: tuple[int, ...] = STRIDES) -> MMDetAnchorGenerator:
    """The release's anchor layout: octave base 4, 3 scales per octave, ratios (1, 0.5, 2), the given strides."""
    return MMDetAnchorGenerator(strides, RATIOS, octave_base_scale=4, scales_per_octave=3)


def circumscribed_xyxy(boxes_oc: Tensor) -> Tensor:
    """Axis-aligned ``[N, 4]`` ``(x1, y1, x2, y2)`` of mmrotate ``obb2hbb_oc`` of 'oc' boxes ``[N, 5]``.

    ``obb2hbb_oc`` gives ``(cx, cy, sin a w + cos a h, cos a w + sin a h, pi/2)``: a box whose w-side is vertical,
    i.e. x extent ``cos a w + sin a h`` and y extent ``sin a w + cos a h`` (no absolute values: 'oc' angles lie
    in (0, pi/2]).
    """
    cx, cy, w, h, a = boxes_oc.unbind(dim=-1)
    cos, sin = torch.cos(a), torch.sin(a)
    half_x, half_y = (cos * w + sin * h) / 2, (sin * w + cos * h) / 2
    return torch.stack([cx - half_x, cy - half_y, cx + half_x, cy + half_y], dim=-1)


class RotatedRetinaNet(nn.Module):
    """The rotated RetinaNet detector.

    Args:
        backbone: A :class:`FeatureBackbone` giving five maps (strides 8-128); ``backbone.body`` is the dense
            backbone a tuning method applies to.
        head: The head.
        assign_by_circumhbbox: Assign anchors by IoU with the ground truth's circumscribed box (the release's
            "hbb" and KLD configs) instead of the rotated box ("obb").
        box_loss: ``"l1"`` on the deltas or ``"kld"`` on the decoded boxes.
        score_threshold: Sigmoid score an (anchor, class) must exceed to reach NMS.
        nms_pre: Anchors kept per level before NMS (by their best class score).
        nms_iou: Rotated NMS IoU threshold (suppress above).
        max_per_image: Detections kept per image.
        test_size: None (inference at the input size) or the long side images are resized to (keep-ratio,
            mmcv rounding) before inference; boxes are mapped back.
        size_divisor: Images are padded to a multiple of this.
    """

    size_buckets: int | tuple[int, ...] | None = None  # the tasks' compile option (monatune.compiling)

    def __init__(
        self,
        backbone: nn.Module,
        head: RotatedRetinaHead,
        *,
        assign_by_circumhbbox: bool = False,
        box_loss: str = "l1",
        score_threshold: float = 0.05,
        nms_pre: int = 2000,
        nms_iou: float = 0.1,
        max_per_image: int = 2000,
        test_size: int | None = None,
        size_divisor: int = 32,
    ) -> None:
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"`box_loss` must be one of {BOX_LOSSES}, got {box_loss!r}")
        self.backbone, self.head = backbone, head
        self.num_classes = head.num_classes
        self.anchor_generator = rotated_anchor_generator()
        self.assigner = MaxIoUAssigner(0.5, 0.4, min_pos_iou=0.0)
        self.coder = DeltaXYWHACoder(version="oc", edge_swap=False, proj_xy=False)
        self.assign_by_circumhbbox, self.box_loss = bool(assign_by_circumhbbox), box_loss
        self.focal_alpha, self.focal_gamma = 0.25, 2.0
        self.score_threshold, self.nms_pre, self.nms_iou = float(score_threshold), int(nms_pre), float(nms_iou)
        self.max_per_image, self.test_size, self.size_divisor = int(max_per_image), test_size, int(size_divisor)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """Losses (with ``targets``) or detections (without).

        Args:
            images: RGB ``[3, H, W]`` float tensors in 0..1 (any sizes).
            targets: Per image ``{"boxes": le90 [N, 5], "labels": [N] in 1..K}`` (N may be 0).

        Returns:
            With targets, ``{"loss_cls", "loss_bbox"}``; without, per image ``{"boxes": le90 [N, 5] float32,
            "scores": [N], "labels": [N] in 1..K}`` in the input's pixels.
        """
        if targets is None:
            return self.predict(images)
        return self.losses(images, targets)

    def features(self, batch: Tensor) -> list[Tensor]:
        return list(self.backbone(batch).values())

    def anchors(self, sizes: list[tuple[int, int]], device: torch.device | str) -> list[Tensor]:
        """Each level's anchors ``[H W A, 5]`` ``(cx, cy, w, h, 0)`` in float32, position-major (mmrotate
        ``RotatedAnchorGenerator.grid_priors``); also sets the grid the generator's ``valid_flags`` reads."""
        carriers = [torch.empty((0, 0, h, w), device=device) for h, w in sizes]  # float32 whatever the maps' dtype
        xyxy = self.anchor_generator(ImageList(torch.empty(0, device=device), [(0, 0)]), carriers)[0]
        centre, size = (xyxy[:, 2:] + xyxy[:, :2]) / 2, xyxy[:, 2:] - xyxy[:, :2]
        anchors = torch.cat([centre, size, size.new_zeros(len(size), 1)], dim=1)
        return list(anchors.split([h * w * self.head.num_anchors for h, w in sizes]))

    def assign(self, anchors: Tensor, boxes_oc: Tensor) -> Tensor:
        """``MaxIoUAssigner`` of ``[N]`` anchors to ``[G]`` 'oc' ground truth boxes: matched index, -1 or -2."""
        if len(boxes_oc) == 0:
            return torch.full((len(anchors),), MaxIoUAssigner.BELOW_LOW_THRESHOLD, dtype=torch.long,
                              device=anchors.device)  # fmt: skip
        if self.assign_by_circumhbbox:
            half = anchors[:, 2:4] / 2
            iou = box_iou(circumscribed_xyxy(boxes_oc), torch.cat([anchors[:, :2] - half, anchors[:, :2] + half], 1))
        else:
            iou = rotated_box_iou(boxes_oc, anchors)
        return self.assigner(iou)

    def losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The focal and box losses of a batch."""
        batch = batch_images(images, self.size_divisor, self.size_buckets)
        boxes, labels = checked_targets(targets, len(images), self.num_classes, batch.device)
        labels = [lab - 1 for lab in labels]
        d = self.size_divisor
        pad_shapes = [(-(-image.shape[-2] // d) * d, -(-image.shape[-1] // d) * d) for image in images]
        cls_scores, bbox_preds = self.head(self.features(batch))
        with torch.autocast(batch.device.type, enabled=False):  # the release's force_fp32 losses
            return self.compute_loss([c.float() for c in cls_scores], [b.float() for b in bbox_preds], boxes, labels,
                                     pad_shapes)  # fmt: skip

    def compute_loss(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], boxes: list[Tensor],
                     labels: list[Tensor], pad_shapes: list[tuple[int, int]]) -> dict[str, Tensor]:  # fmt: skip
        """``RotatedAnchorHead.loss`` on the head's outputs.

        Args:
            cls_scores: Per level ``[B, A K, H, W]`` logits.
            bbox_preds: Per level ``[B, A 5, H, W]`` deltas.
            boxes: Per image ``[G, 5]`` le90 ground truth.
            labels: Per image ``[G]`` 0-based classes.
            pad_shapes: Per image its size padded to the size divisor (mmdet ``pad_shape``), for the valid flags.
        """
        sizes = [(int(c.shape[-2]), int(c.shape[-1])) for c in cls_scores]
        device, k = cls_scores[0].device, self.num_classes
        anchors = self.anchors(sizes, device)
        levels = torch.cat([torch.full((len(a),), i, dtype=torch.long, device=device) for i, a in enumerate(anchors)])
        anchors = torch.cat(anchors)
        cls_sum = box_sum = cls_scores[0].new_zeros(())
        avg_factor = 0
        decoded, matched_gt, pos_levels = [], [], []
        for i, (gt, gt_labels) in enumerate(zip(boxes, labels)):
            logits = torch.cat([c[i].permute(1, 2, 0).reshape(-1, k) for c in cls_scores])
            deltas = torch.cat([b[i].permute(1, 2, 0).reshape(-1, 5) for b in bbox_preds])
            valid = self.anchor_generator.valid_flags(pad_shapes[i], device)
            image_anchors, logits, deltas, image_levels = anchors[valid], logits[valid], deltas[valid], levels[valid]
            gt_oc = le90_to_oc(gt)
            matched = self.assign(image_anchors, gt_oc)
            positive = matched >= 0
            cared = matched != MaxIoUAssigner.BETWEEN_THRESHOLDS  # label weight 1: positives and negatives
            goal = torch.zeros_like(logits)
            goal[positive, gt_labels[matched[positive]]] = 1.0
            cls_sum = cls_sum + sigmoid_focal_loss(logits[cared], goal[cared], alpha=self.focal_alpha,
                                                   gamma=self.focal_gamma, reduction="sum")  # fmt: skip
            num_pos = int(positive.sum())
            avg_factor += max(num_pos, 1)
            pos_anchors, pos_deltas, pos_gt = image_anchors[positive], deltas[positive], gt_oc[matched[positive]]
            if self.box_loss == "l1":
                box_sum = box_sum + (pos_deltas - self.coder.encode(pos_anchors, pos_gt)).abs().sum()
            else:
                decoded.append(self.coder.decode(pos_anchors, pos_deltas))
                matched_gt.append(pos_gt)
                pos_levels.append(image_levels[positive])
        loss_cls = cls_sum / (avg_factor + AVG_EPS)
        if self.box_loss == "l1":
            return {"loss_cls": loss_cls, "loss_bbox": box_sum / (avg_factor + AVG_EPS)}
        loss_bbox = kld_level_loss(torch.cat(decoded), torch.cat(matched_gt), torch.cat(pos_levels), len(sizes))
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}

    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image, in the images' own pixels."""
        images, factors = resize_for_test(images, self.test_size)
        batch = batch_images(images, self.size_divisor, self.size_buckets)
        cls_scores, bbox_preds = self.head(self.features(batch))
        anchors = self.anchors([(int(c.shape[-2]), int(c.shape[-1])) for c in cls_scores], batch.device)
        results = []
        with torch.autocast(batch.device.type, enabled=False):
            for i, (image, factor) in enumerate(zip(images, factors)):
                cls = [c[i].detach().float() for c in cls_scores]
                box = [b[i].detach().float() for b in bbox_preds]
                results.append(self._detections(cls, box, anchors, tuple(image.shape[-2:]), factor))
        return results

    def _detections(self, cls_scores: list[Tensor], bbox_preds: list[Tensor], anchors: list[Tensor],
                    image_shape: tuple[int, int], factor: Tensor | None) -> dict[str, Tensor]:  # fmt: skip
        """One image's ``_get_bboxes_single`` + ``multiclass_nms_rotated`` (levels ``[A K, H, W]``, ``[A 5, H, W]``)."""
        all_boxes, all_scores = [], []
        for cls, box, level_anchors in zip(cls_scores, bbox_preds, anchors):
            scores = cls.permute(1, 2, 0).reshape(-1, self.num_classes).sigmoid()
            deltas = box.permute(1, 2, 0).reshape(-1, 5)
            if 0 < self.nms_pre < len(scores):
                top = scores.max(dim=1).values.topk(self.nms_pre).indices
                scores, deltas, level_anchors = scores[top], deltas[top], level_anchors[top]
            all_boxes.append(self.coder.decode(level_anchors, deltas.contiguous(), max_shape=image_shape))
            all_scores.append(scores)
        boxes, scores = torch.cat(all_boxes), torch.cat(all_scores)
        if factor is not None:  # rescale=True: back to the input's pixels before NMS (the angle stays)
            boxes[:, :4] = boxes[:, :4] / factor.to(boxes)
        anchor, label = torch.nonzero(scores > self.score_threshold, as_tuple=True)
        boxes, scores = boxes[anchor], scores[anchor, label]
        keep = batched_rotated_nms(boxes, scores, label, self.nms_iou)
        if self.max_per_image > 0:
            keep = keep[: self.max_per_image]
        return {"boxes": oc_to_le90(boxes[keep]).float(), "scores": scores[keep], "labels": label[keep] + 1}


def build_rotated_retinanet(
    backbone: str,
    *,
    num_classes: int,
    method: str | None = None,
    method_options: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    assign_by_circumhbbox: bool = False,
    box_loss: str = "l1",
    fpn_channels: int = 256,
    score_threshold: float = 0.05,
    nms_pre: int = 2000,
    nms_iou: float = 0.1,
    max_per_image: int = 2000,
    test_size: int | None = None,
    size_divisor: int = 32,
) -> RotatedRetinaNet:
    """Rotated RetinaNet on a (tuned) timm backbone, configured as the release's STAR models.

    Args:
        backbone: timm model name (Swin v1: stages 1-3 feed the FPN; ViT family: a simple pyramid).
        num_classes: Object classes K; labels are 1..K.
        method: Tuning method for the backbone (None: untuned).
        method_options: The method's options.
        model_kwargs: Extra ``timm.create_model`` arguments (e.g. ``drop_path_rate``).
        assign_by_circumhbbox: Assign anchors by the ground truth's circumscribed box (the release's
            ``rotated_retinanet_hbb`` and KLD configs) rather than the rotated box (``rotated_retinanet_obb``).
        box_loss: ``"l1"`` (deltas) or ``"kld"`` (the release's KLD config: decoded boxes, ``GDLoss_v1`` kld,
            log1p, tau 1).
        fpn_channels: FPN and head width (256).
        score_threshold, nms_pre, nms_iou, max_per_image: Inference (0.05, 2000, 0.1, 2000).
        test_size: None (STAR: no resize) or the long side images are resized to at inference.
        size_divisor: Padding multiple (train 32).

    Returns:
        The detector; ``model.backbone.body`` is the dense backbone the method applies to.

    Example:
        >>> model = build_rotated_retinanet("swin_base_patch4_window7_224", num_classes=48, method="mona",
        ...                                 assign_by_circumhbbox=True, box_loss="kld")
    """
    check_build_args(num_classes, fpn_channels, test_size, size_divisor)
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"`box_loss` must be one of {BOX_LOSSES}, got {box_loss!r}")
    features = feature_backbone(backbone, method, method_options, model_kwargs, levels=[1, 2, 3], extra="p6p7",
                                fpn_channels=fpn_channels)  # fmt: skip
    head = RotatedRetinaHead(num_classes, fpn_channels, feat_channels=fpn_channels)
    return RotatedRetinaNet(features, head, assign_by_circumhbbox=assign_by_circumhbbox, box_loss=box_loss,
                            score_threshold=score_threshold, nms_pre=nms_pre, nms_iou=nms_iou,
                            max_per_image=max_per_image, test_size=None if test_size is None else int(test_size),
                            size_divisor=size_divisor)  # fmt: skip
