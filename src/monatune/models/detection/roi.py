"""RoI operations as mmdetection 2.x computes them: multi-level RoIAlign, mask targets, mask pasting.

The release's Cascade Mask R-CNN ran on mmdetection 2.11 and mmcv 1.x; torchvision's versions of
these three steps differ in ways that change results, so monatune writes them on torchvision's
``roi_align`` and ``grid_sample``:

- :class:`LevelRoIAlign` is mmdet's ``SingleRoIExtractor``: mmcv's ``RoIAlign`` is *aligned*
  (half-pixel offset) with an adaptive sampling grid (``sampling_ratio=0``), and the level of a RoI
  is ``floor(log2(sqrt(w * h) / 56 + 1e-6))`` on fixed strides. torchvision's
  ``MultiScaleRoIAlign`` always calls ``roi_align`` with ``aligned=False`` and infers the strides.
- :func:`mask_targets` crops each matched ground-truth mask with an aligned RoIAlign and
  binarises it at 0.5 (``BitmapMasks.crop_and_resize``); torchvision's ``project_masks_on_boxes``
  is not aligned and trains on soft targets.
- :func:`paste_masks` is mmdet's ``_do_paste_mask``: a ``grid_sample`` of the 28 × 28 map over the
  box's pixel centres. torchvision's ``paste_masks_in_image`` pads the map by one pixel, rounds the
  box to whole pixels and resizes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

__all__ = ["LevelRoIAlign", "mask_targets", "paste_masks"]


class LevelRoIAlign(nn.Module):
    """mmdet 2.x ``SingleRoIExtractor`` with mmcv's ``RoIAlign`` (aligned, adaptive sampling).

    Args:
        featmap_names: The feature maps to pool from, finest first.
        output_size: Side of the pooled map (7 for boxes, 14 for masks).
        strides: Stride of each map (the release: 4, 8, 16, 32).
        sampling_ratio: Samples per bin side; 0 = ``ceil(roi_size / output_size)`` (mmcv and torchvision agree).
        finest_scale: RoIs with ``sqrt(area) < 2 * finest_scale`` go to the finest map (mmdet: 56).
    """

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size: int,
        strides: Sequence[int] = (4, 8, 16, 32),
        *,
        sampling_ratio: int = 0,
        finest_scale: float = 56.0,
    ) -> None:
        super().__init__()
        if len(featmap_names) != len(strides):
            raise ValueError(f"one stride per feature map: got {list(featmap_names)} and strides {list(strides)}")
        self.featmap_names = list(featmap_names)
        self.output_size = (output_size, output_size)
        self.strides = [float(s) for s in strides]
        self.sampling_ratio = sampling_ratio
        self.finest_scale = finest_scale

    def levels(self, boxes: Tensor) -> Tensor:
        """The 0-based level of each (K, 4) box."""
        scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        return torch.floor(torch.log2(scale / self.finest_scale + 1e-6)).clamp(0, len(self.strides) - 1).long()

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]] | None = None) -> Tensor:
        """Pool every box of every image: (K, C, S, S), in the order of ``torch.cat(boxes)``.

        ``image_shapes`` is accepted for torchvision's ``MultiScaleRoIAlign`` call signature and unused.
        """
        maps = [features[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
        out = maps[0].new_zeros((len(rois), maps[0].shape[1], *self.output_size))
        if len(rois) == 0:
            return out
        levels = self.levels(rois[:, 1:])
        for level, (feature, stride) in enumerate(zip(maps, self.strides)):
            idx = torch.where(levels == level)[0]
            if len(idx):
                pooled = roi_align(feature, rois[idx].to(feature.dtype), self.output_size, 1.0 / stride, self.sampling_ratio, aligned=True)
                out[idx] = pooled.to(out.dtype)
        return out


def mask_targets(gt_masks: Tensor, boxes: Tensor, matched: Tensor, size: int = 28) -> Tensor:
    """Binary (K, size, size) targets: each box's matched gt mask cropped by an aligned RoIAlign, >= 0.5.

    Args:
        gt_masks: (N, H, W) instance masks of one image (any dtype; 0/1 values).
        boxes: (K, 4) positive RoIs, x1, y1, x2, y2 in the same pixels (clipped to the mask here, as mmdet does).
        matched: (K,) index of each RoI's ground truth.
        size: Output side (the release: 28).
    """
    if len(boxes) == 0:
        return boxes.new_zeros((0, size, size))
    H, W = gt_masks.shape[-2:]
    b = boxes.detach().clone()
    b[:, 0::2] = b[:, 0::2].clamp(0, W)
    b[:, 1::2] = b[:, 1::2].clamp(0, H)
    rois = torch.cat([torch.arange(len(b), device=b.device, dtype=b.dtype)[:, None], b], 1)
    masks = gt_masks[matched][:, None].to(b.dtype)
    return (roi_align(masks, rois, (size, size), 1.0, 0, aligned=True)[:, 0] >= 0.5).to(boxes.dtype)


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """mmdet's ``_do_paste_mask``: (N, 1, h, w) probabilities over (N, 4) boxes into (N, 1, H, W).

    Every image pixel centre inside a box samples the map bilinearly (``grid_sample``,
    ``align_corners=False``, zeros outside); the result keeps probabilities (threshold them after).
    """
    H, W = image_size
    N = len(masks)
    if N == 0:
        return masks.new_zeros((0, 1, H, W))
    x0, y0, x1, y1 = boxes.to(torch.float32).split(1, dim=1)  # each N, 1
    img_y = torch.arange(H, device=masks.device, dtype=torch.float32) + 0.5
    img_x = torch.arange(W, device=masks.device, dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1  # N, H
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1  # N, W
    img_x = torch.where(torch.isinf(img_x), torch.zeros_like(img_x), img_x)  # zero-width boxes, as mmdet
    img_y = torch.where(torch.isinf(img_y), torch.zeros_like(img_y), img_y)
    grid = torch.stack([img_x[:, None, :].expand(N, H, W), img_y[:, :, None].expand(N, H, W)], dim=3)
    return F.grid_sample(masks.to(torch.float32), grid, align_corners=False)
