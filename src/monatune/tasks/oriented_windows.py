"""Oriented detection on whole images: sliding windows, and merging patch detections back.

Two ways the release turns patch detections into whole-image ones (spec §3.4, §3.5):

- **STAR** (``H2RBoxV2PDetectorCrop.simple_test``): the full image, padded to a multiple of 64, is
  cut into 1024 windows with a 200-pixel gap (windows mostly outside the image dropped, as the
  split tool does), batches of 4 windows go through the detector, each window's detections move
  by its offset and pass a class-agnostic rotated NMS at 0.4, and then all of them pass another
  class-agnostic rotated NMS at 0.4 (``merge_results``). :func:`detect_full_image` does this,
  reading only the windows' pixels (:class:`~monatune.data.large_images.LargeImage`), so a
  27,860 x 31,096 STAR image never sits decoded in memory at once where its format allows.
  The two-stage detectors (``RotatedTwoStageDetectorCrop``: Oriented R-CNN) differ: the full image
  is padded to 32 by the test pipeline, 2 windows go per pass, and all windows' detections pass one
  *per-class* rotated NMS at 0.4 (``merge_results_two_stage``, run twice, which changes nothing the
  second time); ``per_class=True``.
- **DOTA** test patches (``DOTAWSOODDataset.merge_det``): the patches that ``monatune split`` cut
  from one image (``<id>__1024__<x>___<y>``) are moved by their offsets and merged per class by
  rotated NMS at 0.1 (:func:`merge_patches`).

The release pads windows that overhang the image with normalised values about RGB (124, 116, 104)
and the full image's 64-pixel padding with zeros (the mean colour after normalisation); the
windows here are built in pixel space with the same colours, so the detector's own normalisation
gives the release's values.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.split import sliding_windows
from ..ops import batched_rotated_nms, rotated_nms

__all__ = ["sliding_windows", "detect_full_image", "merge_patches", "patch_origin", "WINDOW_PAD_RGB"]

# the release's normalised window padding (0.00819, -0.00490, 0.00557) back in RGB 0..255
_MEAN = (123.675, 116.28, 103.53)
_STD = (58.395, 57.12, 57.375)
_PAD_NORMALISED = (0.0081917211329, -0.004901960784, 0.0055655449953)
WINDOW_PAD_RGB = tuple(m + p * s for m, p, s in zip(_MEAN, _PAD_NORMALISED, _STD))
_PATCH_NAME = re.compile(r"__(\d+)___(\d+)")


def _window_pixels(image: Any, window: Sequence[int], padded: tuple[int, int]) -> Tensor:
    """A window as float RGB 0..1 ``[3, size, size]``: the image's pixels, the mean colour over the
    64-pixel padding of the full image, the release's padding colour beyond it."""
    x1, y1, x2, y2 = (int(v) for v in window)
    width, height = image.size
    out = torch.empty(3, y2 - y1, x2 - x1)
    out[:] = torch.tensor(WINDOW_PAD_RGB).view(3, 1, 1) / 255
    pw, ph = min(padded[0], x2) - x1, min(padded[1], y2) - y1
    out[:, :ph, :pw] = torch.tensor(_MEAN).view(3, 1, 1) / 255
    rx2, ry2 = min(width, x2), min(height, y2)
    if rx2 > x1 and ry2 > y1:
        pixels = torch.from_numpy(np.ascontiguousarray(image.read(x1, y1, rx2, ry2)))  # h, w, 3 uint8
        out[:, : ry2 - y1, : rx2 - x1] = pixels.permute(2, 0, 1).float() / 255
    return out


def detect_full_image(
    detect: Callable[[list[Tensor]], list[dict[str, Tensor]]],
    image: Any,
    *,
    size: int = 1024,
    gap: int = 200,
    rate_threshold: float = 0.6,
    batch: int = 4,
    merge_iou: float = 0.4,
    pad_divisor: int = 64,
    per_class: bool = False,
    device: torch.device | str = "cpu",
    progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None,
) -> dict[str, Tensor]:
    """Detections on a whole image by sliding windows, merged as the release's STAR test does.

    Args:
        detect: the detector in evaluation mode: a list of float RGB 0..1 ``[3, H, W]`` windows in,
            one ``{"boxes" (le90), "scores", "labels"}`` per window out (window pixels).
        image: an open :class:`~monatune.data.large_images.LargeImage` (``size`` and ``read``).
        size: Window side.
        gap: Overlap of neighbouring windows.
        rate_threshold: Windows with no more than this share inside the (padded) image are dropped.
        batch: Windows per forward pass (the release: 4 for single-stage detectors, 2 for two-stage).
        merge_iou: IoU of the class-agnostic rotated NMS within each window and then over all.
        pad_divisor: The full image is padded to a multiple of this first (the release: 64 for H2RBox,
            32 for the detectors on its ``star.py`` data base).
        per_class: One per-class rotated NMS over all windows' detections instead (two-stage detectors).
        device: Where the windows go.
        progress: Wraps the window batches (with their count) to show progress, e.g. a tqdm bar.

    Returns:
        ``{"boxes": le90 [N, 5], "scores": [N], "labels": [N]}`` in the image's pixels, on the CPU.
    """
    width, height = image.size
    padded = (math.ceil(width / pad_divisor) * pad_divisor, math.ceil(height / pad_divisor) * pad_divisor)
    windows = sliding_windows(*padded, size=size, gap=gap, rate_threshold=rate_threshold)
    # read row band by row band (a sequential decoder then keeps only a band); merge in the release's order
    order = sorted(range(len(windows)), key=lambda k: (windows[k][1], windows[k][0]))
    chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
    found: dict[int, dict[str, Tensor]] = {}
    for chunk in progress(chunks, len(chunks)) if progress is not None else chunks:
        pixels = [_window_pixels(image, windows[k], padded).to(device) for k in chunk]
        for k, det in zip(chunk, detect(pixels)):
            boxes = det["boxes"].detach().float().cpu().clone()
            boxes[:, 0] += float(windows[k][0])
            boxes[:, 1] += float(windows[k][1])
            scores, labels = det["scores"].detach().float().cpu(), det["labels"].cpu()
            if not per_class:
                keep = rotated_nms(boxes, scores, merge_iou)  # within the window, class-agnostic
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            found[k] = {"boxes": boxes, "scores": scores, "labels": labels}
    merged = {key: torch.cat([found[k][key] for k in range(len(windows))]) for key in ("boxes", "scores", "labels")}
    if per_class:
        keep = batched_rotated_nms(merged["boxes"], merged["scores"], merged["labels"], merge_iou)
    else:
        keep = rotated_nms(merged["boxes"], merged["scores"], merge_iou)
    return {key: value[keep] for key, value in merged.items()}


def patch_origin(name: str) -> tuple[str, int, int]:
    """``("P0003", 824, 0)`` from a split patch's name ``P0003__1024__824___0``; a name without the
    pattern is a whole image at ``(0, 0)``."""
    match = _PATCH_NAME.search(name)
    if match is None:
        return name, 0, 0
    return name.split("__")[0], int(match.group(1)), int(match.group(2))


def merge_patches(patches: Iterable[tuple[str, dict[str, Tensor]]], iou_threshold: float = 0.1) -> dict[str, dict[str, Tensor]]:
    """Merge detections of split patches into their images, as the release's ``merge_det`` does.

    Args:
        patches: ``(patch name, {"boxes" (le90, patch pixels), "scores", "labels"})`` pairs.
        iou_threshold: The per-class rotated NMS over each image's patches (the release: 0.1).

    Returns:
        image id -> its detections in the image's pixels, by descending score (no threshold, no cap).
    """
    grouped: dict[str, list[dict[str, Tensor]]] = {}
    for name, det in patches:
        image_id, x, y = patch_origin(name)
        boxes = det["boxes"].detach().float().cpu().clone()
        boxes[:, 0] += x
        boxes[:, 1] += y
        grouped.setdefault(image_id, []).append(
            {"boxes": boxes, "scores": det["scores"].detach().float().cpu(), "labels": det["labels"].cpu()}
        )
    merged = {}
    for image_id, dets in grouped.items():
        joined = {key: torch.cat([d[key] for d in dets]) for key in ("boxes", "scores", "labels")}
        keep = batched_rotated_nms(joined["boxes"], joined["scores"], joined["labels"], iou_threshold)
        merged[image_id] = {key: value[keep] for key, value in joined.items()}
    return merged
