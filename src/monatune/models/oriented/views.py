"""Input batching and H2RBox-v2+'s self-supervised views, as the release's mmdetection pipeline and
``H2RBoxV2PDetector.forward_train`` form them.

- :func:`batch_images`: mmcv ``Normalize`` (mean/std on the 0-255 scale; the input is RGB in 0..1),
  ``Pad(size_divisor)`` with 0 at the bottom/right, and mmcv's ``collate``, which pads every image
  to the batch's largest padded size (also with 0, the mean colour after normalisation).
- :func:`make_views`: one view of the whole padded batch per iteration: with probability
  ``prob_rot`` a clockwise turn by rot = pi * U(view_range) (torchvision ``rotate``, nearest, no
  expand, fill 0, about the tensor's centre (W/2, H/2)), else a vertical flip; ground truth follows
  (centres turned/flipped, angle + rot or negated, never wrapped or clipped) and every object id
  k becomes k + 0.5. Random draws use torch's global generator, so Lightning's seeding repeats them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import functional as TF

from ...compiling import padded_side

__all__ = ["MEAN", "STD", "batch_images", "object_ids", "make_views"]

MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 scale
STD = (58.395, 57.12, 57.375)


def batch_images(
    images: Sequence[Tensor], size_divisor: int = 32, size_buckets: int | Sequence[int] | None = None
) -> Tensor:
    """Normalise RGB images in 0..1 and pad them (bottom/right, 0) into one ``[B, 3, H, W]`` tensor.

    H and W are the largest image's sides rounded up to a multiple of ``size_divisor`` (mmcv pads
    each image to the divisor, then collate pads to the largest: the same size), then up to their
    ``size_buckets`` (:func:`monatune.compiling.padded_side`) when given.
    """
    if len(images) == 0:
        raise ValueError("no images were given; pass a list of [3, H, W] tensors")
    for image in images:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"images must be [3, H, W] RGB tensors in 0..1, got shape {tuple(image.shape)}")
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    height, width = padded_side(height, size_divisor, size_buckets), padded_side(width, size_divisor, size_buckets)
    mean = torch.tensor(MEAN, device=images[0].device)[:, None, None]
    std = torch.tensor(STD, device=images[0].device)[:, None, None]
    batch = []
    for image in images:
        normalised = (image.float() * 255 - mean) / std
        batch.append(F.pad(normalised, (0, width - image.shape[-1], 0, height - image.shape[-2]), value=0.0))
    return torch.stack(batch)


def object_ids(counts: Sequence[int], device: torch.device | str | None = None) -> list[Tensor]:
    """Ids 1, 2, 3, ... continuing across the images (one per ground-truth box), float32."""
    ids, offset = [], 1
    for n in counts:
        ids.append(torch.arange(n, device=device, dtype=torch.float32) + offset)
        offset += n
    return ids


def make_views(
    images: Tensor,
    boxes: Sequence[Tensor],
    labels: Sequence[Tensor],
    *,
    prob_rot: float = 0.95,
    view_range: tuple[float, float] = (0.25, 0.75),
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], tuple[str, float]]:
    """Originals and their views: ``2B`` images with their ground truth and ids.

    Args:
        images: ``[B, 3, H, W]`` the normalised, padded batch.
        boxes: Per image, ``[G, 5]`` le90 boxes.
        labels: Per image, ``[G]`` labels (any indexing; copied to the views).
        prob_rot: Probability of the rotated view (else the flipped one).
        view_range: The turn's range as fractions of pi.

    Returns:
        images ``[2B, 3, H, W]``, boxes, labels and ids (lists of 2B), and ``("rot", rot)`` or
        ``("flp", 0)``.
    """
    ids = object_ids([len(b) for b in boxes], device=images.device)
    height, width = images.shape[-2:]
    view_boxes = [b.clone().float() for b in boxes]
    if torch.rand(1) < prob_rot:
        rot = math.pi * (torch.rand(1).item() * (view_range[1] - view_range[0]) + view_range[0])
        view = TF.rotate(images, -rot / math.pi * 180)  # clockwise on screen; nearest, fill 0
        cos, sin = math.cos(rot), math.sin(rot)
        turn = images.new_tensor([[cos, -sin], [sin, cos]], dtype=torch.float)
        centre = turn.new_tensor([[width / 2, height / 2]])
        for b in view_boxes:
            b[:, :2] = (b[:, :2] - centre).matmul(turn.T) + centre
            b[:, 4] = b[:, 4] + rot
        kind: tuple[str, float] = ("rot", rot)
    else:
        view = TF.vflip(images)
        for b in view_boxes:
            b[:, 1] = height - b[:, 1]
            b[:, 4] = -b[:, 4]
        kind = ("flp", 0.0)
    all_boxes = [b.float() for b in boxes] + view_boxes
    all_ids = ids + [i + 0.5 for i in ids]
    return torch.cat([images, view]), all_boxes, list(labels) * 2, all_ids, kind
