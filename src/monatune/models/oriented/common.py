"""What the oriented detectors share: their builders' argument checks, the tuned backbone + FPN, the
ground-truth checks of ``forward(images, targets)``, and the test-time long-side resize."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dense import build_dense_backbone, is_hierarchical
from ..detection.builders import FeatureBackbone
from ..detection.transform import rescale_size

__all__ = ["check_build_args", "feature_backbone", "checked_targets", "resize_long_side", "resize_for_test"]


def check_build_args(num_classes: int, fpn_channels: int, test_size: int | None, size_divisor: int, *,
                     fpn_multiple: int = 1) -> None:  # fmt: skip
    """The checks every ``build_*`` of this package makes, with a message naming the argument."""
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be at least 1, got {num_classes}")
    if fpn_channels < fpn_multiple or fpn_channels % fpn_multiple:
        if fpn_multiple > 1:
            raise ValueError(f"`fpn_channels` must be a positive multiple of {fpn_multiple} (GroupNorm with "
                             f"{fpn_multiple} groups), got {fpn_channels}")  # fmt: skip
        raise ValueError(f"`fpn_channels` must be a positive int, got {fpn_channels}")
    if test_size is not None and int(test_size) < 1:
        raise ValueError(f"`test_size` must be None or a positive side length, got {test_size}")
    if int(size_divisor) < 1:
        raise ValueError(f"`size_divisor` must be a positive int, got {size_divisor}")


def feature_backbone(backbone: str, method: str | None, method_options: dict[str, Any] | None,
                     model_kwargs: dict[str, Any] | None, *, levels: list[int], extra: str,
                     fpn_channels: int) -> FeatureBackbone:  # fmt: skip
    """The (tuned) dense backbone and its FPN: a Swin gives the stages ``levels`` (through their output
    norms); a ViT-family model's last block feeds a simple pyramid."""
    body = build_dense_backbone(backbone, method, out_indices=levels if is_hierarchical(backbone) else [-1], model_kwargs=model_kwargs,
                                **(method_options or {}))  # fmt: skip
    return FeatureBackbone(body, levels=levels, extra=extra, out_channels=fpn_channels)


def checked_targets(targets: list[dict[str, Tensor]], n_images: int, num_classes: int, device: torch.device, *,
                    positive_sizes: bool = True) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """Each image's ground truth as float32 le90 boxes ``[N, 5]`` and int64 labels ``[N]`` in 1..K on
    ``device``, or a ValueError saying what is wrong (``positive_sizes``: w and h must be finite and > 0)."""
    if len(targets) != n_images:
        raise ValueError(f"one target per image is needed, got {n_images} images and {len(targets)} targets")
    boxes, labels = [], []
    for target in targets:
        b, lab = torch.as_tensor(target["boxes"]), torch.as_tensor(target["labels"])
        if b.dim() != 2 or b.shape[-1] != 5 or lab.dim() != 1 or len(lab) != len(b):
            raise ValueError(f"targets need 'boxes' [N, 5] (le90) and 'labels' [N], got {tuple(b.shape)} and {tuple(lab.shape)}")
        if len(lab) and (int(lab.min()) < 1 or int(lab.max()) > num_classes):
            raise ValueError(f"labels must be in 1..{num_classes}, got {lab.min().item()}..{lab.max().item()}")
        if positive_sizes and len(b) and not bool(torch.isfinite(b).all() and (b[:, 2:4] > 0).all()):
            raise ValueError("target boxes must be finite with positive w and h")
        boxes.append(b.to(device, torch.float32))
        labels.append(lab.to(device, torch.long))
    return boxes, labels


def resize_long_side(image: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """mmcv ``imrescale`` to ``(size, size)`` keep-ratio (bilinear, sizes rounded, values rounded to the
    0-255 grid as on uint8 images) and mmdet's scale factor (w_scale, h_scale, w_scale, h_scale)."""
    h, w = image.shape[-2:]
    new_h, new_w = rescale_size(h, w, size, size)
    if (new_h, new_w) != (h, w):
        scaled = F.interpolate(image[None].float() * 255, size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        image = scaled.round().clamp(0, 255) / 255
    w_scale, h_scale = new_w / w, new_h / h
    return image, torch.tensor([w_scale, h_scale, w_scale, h_scale], device=image.device)


def resize_for_test(images: list[Tensor], test_size: int | None) -> tuple[list[Tensor], list[Tensor | None]]:
    """The images resized so their long side is ``test_size`` (:func:`resize_long_side`) with each one's
    scale factor, or (``test_size`` None) the images as they are with no factors."""
    if test_size is None:
        return images, [None] * len(images)
    resized = [resize_long_side(image, test_size) for image in images]
    return [image for image, _ in resized], [factor for _, factor in resized]
