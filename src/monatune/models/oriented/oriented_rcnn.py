"""Oriented R-CNN (Xie et al., "Oriented R-CNN for Object Detection", ICCV 2021) as the STAR/Mona release runs
it (``configs/oriented_rcnn/oriented_rcnn_swin-b_mona_fpn_1x_star_le90_init.py``), on a (tuned) monatune backbone.

Backbone: the dense Swin's four stages (strides 4-32, each through its output norm) or a ViT's simple pyramid;
FPN to 256 channels with a fifth, max-pooled level (mmdet ``FPN(num_outs=5)``: ``max_pool2d(P5, 1, stride=2)``,
torchvision's ``LastLevelMaxPool``). RPN: :class:`~.oriented_rpn.OrientedRPN` on all five levels. RoI head:
:class:`~.rotated_roi_head.RotatedRoIHead` on the first four.

Training (``forward(images, targets)``): images are normalised and padded into one batch (:func:`~.views.batch_images`),
the RPN's losses and its 2000 detached proposals per image, then the RoI head's losses:
``{"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"}`` (their sum is the release's loss; mmdet's
``acc`` is not a loss and is not returned). Inference (``forward(images)``): proposals, RoI head, per-class
rotated NMS; boxes in the input images' pixels (``test_size`` resizes the long side first, as H2RBox-v2+).

The STAR full-image inference (``OrientedRCNNCrop``: windows of a large scene, merged by class-wise NMS) is not
part of the model; the task code runs any detector over windows.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from ...ops.roi_align_rotated import MultiScaleRotatedRoIAlign
from ..detection.anchors import MMDetAnchorGenerator
from .coders import MidpointOffsetCoder
from .common import check_build_args, checked_targets, feature_backbone, resize_for_test
from .oriented_rpn import OrientedRPN, build_oriented_rpn_head
from .rotated_roi_head import RotatedBoxHead, RotatedRoIHead, release_roi_coder
from .views import batch_images

__all__ = ["OrientedRCNN", "build_oriented_rcnn"]


class OrientedRCNN(nn.Module):
    """Oriented R-CNN: backbone + FPN, oriented RPN, rotated RoI head.

    Args:
        backbone: A :class:`FeatureBackbone` giving five maps (strides 4-64); ``backbone.body`` is the dense
            backbone a tuning method applies to.
        rpn: The oriented RPN.
        roi_head: The RoI head.
        test_size: None (inference at the input size) or the long side images are resized to (keep-ratio,
            mmcv rounding) before inference; boxes are mapped back.
        size_divisor: Images are padded to a multiple of this.
    """

    size_buckets: int | tuple[int, ...] | None = None  # the tasks' compile option (monatune.compiling)

    def __init__(
        self,
        backbone: nn.Module,
        rpn: OrientedRPN,
        roi_head: RotatedRoIHead,
        *,
        test_size: int | None = None,
        size_divisor: int = 32,
    ) -> None:
        super().__init__()
        self.backbone, self.rpn, self.roi_head = backbone, rpn, roi_head
        self.num_classes = roi_head.num_classes
        self.test_size, self.size_divisor = test_size, int(size_divisor)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """Losses (with ``targets``) or detections (without).

        Args:
            images: RGB ``[3, H, W]`` float tensors in 0..1 (any sizes).
            targets: Per image ``{"boxes": le90 [N, 5], "labels": [N] in 1..K}`` (N may be 0).

        Returns:
            With targets, ``{"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"}``; without, per image
            ``{"boxes": le90 [N, 5] float32, "scores": [N], "labels": [N] in 1..K}`` in the input's pixels.
        """
        if targets is None:
            return self.predict(images)
        return self.losses(images, targets)

    def features(self, images: list[Tensor]) -> tuple[ImageList, dict[str, Tensor]]:
        """The padded batch (with each image's unpadded size) and the FPN's five maps."""
        batch = batch_images(images, self.size_divisor, self.size_buckets)
        sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        return ImageList(batch, sizes), self.backbone(batch)

    def losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The RPN's and the RoI head's losses of a batch."""
        device = images[0].device if len(images) else torch.device("cpu")
        boxes, labels = checked_targets(targets, len(images), self.num_classes, device)
        image_list, features = self.features(images)
        # the heads run in whatever precision autocast gives; their losses cast to float32 (the release's force_fp32)
        proposals, rpn_losses = self.rpn(image_list, features, [{"boxes": b} for b in boxes])
        roi_losses = self.roi_head.loss(list(features.values()), proposals, boxes, labels)
        return {**rpn_losses, **roi_losses}

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image, in the images' own pixels."""
        images, factors = resize_for_test(images, self.test_size)
        image_list, features = self.features(images)
        proposals, _ = self.rpn(image_list, features)
        return self.roi_head.predict(list(features.values()), proposals, image_list.image_sizes, factors)


def build_oriented_rcnn(
    backbone: str,
    *,
    num_classes: int,
    method: str | None = None,
    method_options: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    fpn_channels: int = 256,
    rpn_nms_pre: int = 2000,
    rpn_max_proposals: int = 2000,
    rpn_nms_iou: float = 0.8,
    score_threshold: float = 0.05,
    nms_iou: float = 0.1,
    max_per_image: int = 2000,
    test_size: int | None = None,
    size_divisor: int = 32,
) -> OrientedRCNN:
    """Oriented R-CNN on a (tuned) timm backbone, configured as the release's STAR model.

    Args:
        backbone: timm model name (Swin v1: stages 0-3 feed the FPN; ViT family: a simple pyramid).
        num_classes: Object classes K; labels are 1..K.
        method: Tuning method for the backbone (None: untuned).
        method_options: The method's options.
        model_kwargs: Extra ``timm.create_model`` arguments (e.g. ``drop_path_rate``).
        fpn_channels: FPN, RPN and RoI feature width (256).
        rpn_nms_pre: Anchors kept per level before the RPN's NMS (2000).
        rpn_max_proposals: Proposals kept per image (2000).
        rpn_nms_iou: The RPN's NMS threshold on the proposals' circumscribed boxes (0.8).
        score_threshold, nms_iou, max_per_image: Inference (0.05, rotated NMS 0.1 per class, 2000).
        test_size: None (STAR: no resize) or the long side images are resized to at inference (DOTA: 1024).
        size_divisor: Padding multiple (32).

    Returns:
        The detector; ``model.backbone.body`` is the dense backbone the method applies to.

    Example:
        >>> model = build_oriented_rcnn("swin_base_patch4_window7_224", num_classes=48, method="mona")
    """
    check_build_args(num_classes, fpn_channels, test_size, size_divisor)
    if not 0 < rpn_nms_iou <= 1 or not 0 <= nms_iou <= 1:
        raise ValueError(f"`rpn_nms_iou` and `nms_iou` must lie in (0, 1], got {rpn_nms_iou} and {nms_iou}")
    features = feature_backbone(backbone, method, method_options, model_kwargs, levels=[0, 1, 2, 3], extra="maxpool",
                                fpn_channels=fpn_channels)  # fmt: skip
    anchors = MMDetAnchorGenerator((4, 8, 16, 32, 64), (0.5, 1.0, 2.0), scales=(8,))
    rpn = OrientedRPN(
        anchors, build_oriented_rpn_head(fpn_channels, anchors.num_anchors_per_location()[0]),
        coder=MidpointOffsetCoder(stds=(1.0, 1.0, 1.0, 1.0, 0.5, 0.5), version="le90"),
        pre_nms_top_n=rpn_nms_pre, post_nms_top_n=rpn_max_proposals, nms_thresh=rpn_nms_iou,
    )
    roi_head = RotatedRoIHead(
        MultiScaleRotatedRoIAlign((4, 8, 16, 32), output_size=7, sampling_ratio=2),
        RotatedBoxHead(fpn_channels, num_classes, roi_size=7, fc_channels=1024),
        coder=release_roi_coder(), score_threshold=score_threshold, nms_iou=nms_iou, max_per_image=max_per_image,
    )
    return OrientedRCNN(features, rpn, roi_head, test_size=None if test_size is None else int(test_size),
                        size_divisor=size_divisor)  # fmt: skip
