"""The detectors' input/output transform as mmdetection 2.x's test pipeline sizes images and pastes masks.

torchvision's ``GeneralizedRCNNTransform`` normalises, resizes and batches images and maps the
detections back to the original pixels. :class:`MMDetTransform` keeps all of that and changes
two steps to the release's (mmcv 1.x / mmdetection 2.11):

- the evaluation resize rounds the new size (mmcv's ``rescale_size``: ``int(side * scale + 0.5)``)
  where torchvision floors it; the scale is the same, ``min(short / shorter side, long / longer side)``;
- masks are pasted by :func:`~.roi.paste_masks` (mmdet's ``_do_paste_mask``) instead of
  torchvision's ``paste_masks_in_image``.

With ``size_buckets`` set (the tasks' ``compile`` option, :mod:`monatune.compiling`) a batch is padded
further, up to its size bucket, so that a compiled backbone sees few shapes.
"""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from ...compiling import padded_side
from .roi import paste_masks

__all__ = ["BucketedTransform", "MMDetTransform", "rescale_size"]


def rescale_size(height: int, width: int, short: int, long: int) -> tuple[int, int]:
    """mmcv's ``rescale_size`` for ``img_scale=(long, short)`` with ``keep_ratio=True``: the new (H, W)."""
    scale = min(short / min(height, width), long / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


class BucketedTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` that pads a batch up to its size bucket when ``size_buckets`` is set."""

    size_buckets: int | tuple[int, ...] | None = None

    def batch_images(self, images: list[Tensor], size_divisible: int = 32) -> Tensor:
        batch = super().batch_images(images, size_divisible)
        if self.size_buckets is None:
            return batch
        h, w = (padded_side(s, size_divisible, self.size_buckets) for s in batch.shape[-2:])
        return F.pad(batch, (0, w - batch.shape[-1], 0, h - batch.shape[-2]))  # zeros, right and bottom, as above


class MMDetTransform(BucketedTransform):
    """``GeneralizedRCNNTransform`` with mmcv's rounding of the evaluation size and mmdet's mask pasting."""

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> tuple[Any, Any]:
        out = super().forward(images, targets)
        self.last_image_sizes = list(out[0].image_sizes)  # the resized, unpadded sizes (RetinaNet's valid anchors)
        return out

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        if self.training or self.fixed_size is not None:
            return super().resize(image, target)
        h, w = image.shape[-2:]
        size = rescale_size(h, w, self.min_size[-1], self.max_size)
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), size)
            if "masks" in target:
                target["masks"] = F.interpolate(target["masks"][:, None].float(), size=size)[:, 0].byte()
        return image, target

    def postprocess(
        self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]], original_image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for pred, size, original in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], size, original)
            if "masks" in pred:
                pred["masks"] = paste_masks(pred["masks"], pred["boxes"], original)
        return result
