"""H2RBox-v2+ (Yu et al., NeurIPS 2023; the STAR/Mona release's ``H2RBoxV2PDetector``): oriented
boxes learnt from horizontal boxes, on a (tuned) monatune dense backbone.

Backbone: the dense Swin's stages 1-3 (strides 8-32, each through its output norm) or a ViT's
simple pyramid; FPN to 256 channels with P6 = 3x3/2 conv on P5's output and P7 on ReLU(P6)
(mmdet ``add_extra_convs="on_output"``, ``relu_before_extra_convs``). Head: :class:`~.head.H2RBoxHead`.

Training (``forward(images, targets)``): images are normalised and padded into one batch, a rotated
(p 0.95) or flipped view of the whole batch is appended (:mod:`.views`) and the head's four losses
come back. Inference (``forward(images)``) is the release's ``_get_bboxes_single`` +
``multiclass_nms_rotated``: per level the ``nms_pre`` points with the best score x centerness,
decoded boxes, every (point, class) whose raw score is above ``score_threshold`` ranked by score x
centerness, per-class rotated NMS at IoU > ``nms_iou``, the best ``max_per_image``, then angle 0 for
square classes and w, h x 0.85 for resize classes. Rotated NMS is :func:`monatune.ops.batched_rotated_nms`
(torchvision has none).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...ops import batched_rotated_nms
from .common import check_build_args, checked_targets, feature_backbone, resize_for_test
from .head import H2RBoxHead, grid_points
from .losses import distance_to_le90
from .psc import PSC_STEPS, psc_decode
from .views import batch_images, make_views

__all__ = ["H2RBoxV2P", "build_h2rbox"]


class H2RBoxV2P(nn.Module):
    """The H2RBox-v2+ detector.

    Args:
        backbone: A :class:`FeatureBackbone` giving five maps (strides 8-128); ``backbone.body`` is the
            dense backbone a tuning method applies to.
        head: The head.
        resize_classes: 0-based classes whose predicted w, h are scaled by 0.85 at inference.
        prob_rot: Probability of the rotated view (else a vertical flip).
        view_range: The rotated view's turn, as fractions of pi.
        score_threshold: Raw class score a (point, class) must exceed to reach NMS.
        nms_pre: Points kept per level before NMS (by best class score x centerness).
        nms_iou: Rotated NMS IoU threshold (suppress above).
        max_per_image: Detections kept per image.
        test_size: None (inference at the input size) or the long side images are resized to
            (keep-ratio, mmcv rounding) before inference; boxes are mapped back.
        size_divisor: Images are padded to a multiple of this.
    """

    size_buckets: int | tuple[int, ...] | None = None  # the tasks' compile option (monatune.compiling)

    def __init__(
        self,
        backbone: nn.Module,
        head: H2RBoxHead,
        *,
        resize_classes: Sequence[int] = (),
        prob_rot: float = 0.95,
        view_range: tuple[float, float] = (0.25, 0.75),
        score_threshold: float = 0.05,
        nms_pre: int = 2000,
        nms_iou: float = 0.1,
        max_per_image: int = 2000,
        test_size: int | None = None,
        size_divisor: int = 32,
    ) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.num_classes = head.num_classes
        self.resize_classes = tuple(int(c) for c in resize_classes)
        self.prob_rot, self.view_range = float(prob_rot), (float(view_range[0]), float(view_range[1]))
        self.score_threshold, self.nms_pre, self.nms_iou = float(score_threshold), int(nms_pre), float(nms_iou)
        self.max_per_image, self.test_size, self.size_divisor = int(max_per_image), test_size, int(size_divisor)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """Losses (with ``targets``) or detections (without).

        Args:
            images: RGB ``[3, H, W]`` float tensors in 0..1 (any sizes).
            targets: Per image ``{"boxes": le90 [N, 5], "labels": [N] in 1..K}``.

        Returns:
            With targets, ``{"loss_cls", "loss_bbox", "loss_centerness", "loss_ss"}``; without, per image
            ``{"boxes": le90 [N, 5] float32, "scores": [N], "labels": [N] in 1..K}`` in the input's pixels.
        """
        if targets is None:
            return self.predict(images)
        return self.losses(images, targets)

    def features(self, batch: Tensor) -> list[Tensor]:
        return list(self.backbone(batch).values())

    def losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The four losses of a batch and its self-supervised view."""
        batch = batch_images(images, self.size_divisor, self.size_buckets)
        boxes, labels = checked_targets(targets, len(images), self.num_classes, batch.device, positive_sizes=False)
        labels = [lab - 1 for lab in labels]
        batch, boxes, labels, ids, view = make_views(batch, boxes, labels, prob_rot=self.prob_rot, view_range=self.view_range)
        outputs = self.head(self.features(batch))
        with torch.autocast(batch.device.type, enabled=False):  # the release's force_fp32 losses
            return self.head.loss(outputs, boxes, labels, ids, view)

    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image, in the images' own pixels."""
        images, factors = resize_for_test(images, self.test_size)
        batch = batch_images(images, self.size_divisor, self.size_buckets)
        cls_scores, bbox_preds, angle_preds, centernesses = self.head(self.features(batch))
        points = grid_points([tuple(c.shape[-2:]) for c in cls_scores], self.head.strides, device=batch.device)
        results = []
        for i, factor in enumerate(factors):
            per_level = [(c[i], b[i], a[i], n[i]) for c, b, a, n in zip(cls_scores, bbox_preds, angle_preds, centernesses)]
            results.append(self._detections(per_level, points, factor))
        return results

    def _detections(self, per_level: list[tuple[Tensor, Tensor, Tensor, Tensor]], points: list[Tensor],
                    factor: Tensor | None) -> dict[str, Tensor]:  # fmt: skip
        """One image's ``_get_bboxes_single`` + ``multiclass_nms_rotated``."""
        all_boxes, all_scores, all_ctr = [], [], []
        for (cls, bbox, angle, ctr), level_points, stride in zip(per_level, points, self.head.strides):
            scores = cls.detach().float().permute(1, 2, 0).reshape(-1, self.num_classes).sigmoid()
            centerness = ctr.detach().float().permute(1, 2, 0).reshape(-1).sigmoid()
            distances = bbox.detach().float().permute(1, 2, 0).reshape(-1, 4) * stride
            theta = psc_decode(angle.detach().float().permute(1, 2, 0).reshape(-1, PSC_STEPS))
            if 0 < self.nms_pre < len(scores):
                top = (scores * centerness[:, None]).max(dim=1).values.topk(self.nms_pre).indices
                level_points, distances, theta = level_points[top], distances[top], theta[top]
                scores, centerness = scores[top], centerness[top]
            all_boxes.append(distance_to_le90(level_points, distances, theta))
            all_scores.append(scores)
            all_ctr.append(centerness)
        boxes, scores, centerness = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_ctr)
        if factor is not None:  # rescale=True: back to the input's pixels before NMS, as mmdet
            boxes[:, :4] = boxes[:, :4] / factor
        point, label = torch.nonzero(scores > self.score_threshold, as_tuple=True)
        boxes, ranked = boxes[point], scores[point, label] * centerness[point]
        keep = batched_rotated_nms(boxes, ranked, label, self.nms_iou)
        if self.max_per_image > 0:
            keep = keep[: self.max_per_image]
        boxes, ranked, label = boxes[keep].clone(), ranked[keep], label[keep]
        for c in self.head.square_classes:
            boxes[label == c, 4] = 0
        for c in self.resize_classes:
            boxes[label == c, 2:4] *= 0.85
        return {"boxes": boxes.float(), "scores": ranked, "labels": label + 1}


def _classes(name: str, classes: Sequence[int], num_classes: int) -> list[int]:
    picked = [int(c) for c in classes]
    if any(not 1 <= c <= num_classes for c in picked):
        raise ValueError(f"`{name}` are labels in 1..{num_classes}, got {list(classes)}")
    return [c - 1 for c in picked]


def build_h2rbox(
    backbone: str,
    *,
    num_classes: int,
    method: str | None = None,
    method_options: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    square_classes: Sequence[int] = (),
    resize_classes: Sequence[int] = (),
    prob_rot: float = 0.95,
    view_range: tuple[float, float] = (0.25, 0.75),
    fpn_channels: int = 256,
    score_threshold: float = 0.05,
    nms_pre: int = 2000,
    nms_iou: float = 0.1,
    max_per_image: int = 2000,
    test_size: int | None = None,
    size_divisor: int = 32,
) -> H2RBoxV2P:
    """H2RBox-v2+ on a (tuned) timm backbone, configured as the release's DOTA/STAR models.

    Args:
        backbone: timm model name (Swin v1: stages 1-3 feed the FPN; ViT family: a simple pyramid).
        num_classes: Object classes K; labels are 1..K.
        method: Tuning method for the backbone (None: untuned).
        method_options: The method's options.
        model_kwargs: Extra ``timm.create_model`` arguments (e.g. ``drop_path_rate``).
        square_classes: Labels (1..K) of square-like classes (DOTA: baseball-diamond, storage-tank,
            roundabout; STAR: tank, roundabout): angle 0 in the box loss and at inference, no symmetry loss.
        resize_classes: Labels whose predicted w, h are scaled by 0.85 (DOTA: baseball-diamond).
        prob_rot, view_range: The self-supervised view (rotation with this probability, by
            pi * U(view_range); else a vertical flip).
        fpn_channels: FPN and head width (256; a multiple of 32 for the head's GroupNorm).
        score_threshold, nms_pre, nms_iou, max_per_image: Inference (0.05, 2000, 0.1, 2000).
        test_size: None (STAR: no resize) or the long side images are resized to at inference (DOTA: 1024).
        size_divisor: Padding multiple (train 32; the release's STAR test pads to 64).

    Returns:
        The detector; ``model.backbone.body`` is the dense backbone the method applies to.

    Example:
        >>> model = build_h2rbox("swin_base_patch4_window7_224", num_classes=48, method="mona", square_classes=(5, 45))
    """
    check_build_args(num_classes, fpn_channels, test_size, size_divisor, fpn_multiple=32)
    if not 0 <= view_range[0] <= view_range[1]:
        raise ValueError(f"`view_range` must be (low, high) fractions of pi with 0 <= low <= high, got {view_range}")
    square = _classes("square_classes", square_classes, num_classes)
    resize = _classes("resize_classes", resize_classes, num_classes)
    features = feature_backbone(backbone, method, method_options, model_kwargs, levels=[1, 2, 3], extra="p6p7_relu",
                                fpn_channels=fpn_channels)  # fmt: skip
    head = H2RBoxHead(num_classes, fpn_channels, feat_channels=fpn_channels, square_classes=square)
    return H2RBoxV2P(features, head, resize_classes=resize, prob_rot=prob_rot, view_range=view_range,
                     score_threshold=score_threshold, nms_pre=nms_pre, nms_iou=nms_iou, max_per_image=max_per_image,
                     test_size=None if test_size is None else int(test_size), size_divisor=size_divisor)  # fmt: skip
