"""Greedy non-maximum suppression of rotated boxes (mmcv's ``nms_rotated``), which torchvision lacks.

torchvision has axis-aligned ``nms``/``batched_nms`` and a rotated IoU kernel (``box_iou(fmt="cxcywhr")``)
but no rotated NMS. The greedy rule is mmcv's: in descending score, keep a box unless a kept box has IoU
``> iou_threshold`` with it. A full ``N x N`` IoU matrix does not fit for the tens of thousands of boxes of
a merged large image, so only pairs whose axis-aligned boxes overlap are looked at (others have IoU 0):
they are found by a sweep over x, and a kept box's IoU is computed with its later overlapping boxes only,
still by torchvision's kernel. The result equals the brute-force greedy pass on the full matrix.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .boxes import _check_2d, _extents, le90_to_cxcywhr

__all__ = ["batched_rotated_nms", "rotated_nms"]

_iou_kernel = torch.ops.torchvision.box_iou_rotated  # what box_iou(fmt="cxcywhr") calls, without its checks
_PAIR_CHUNK = 1 << 22  # candidate pairs looked at in one go while finding overlapping boxes


def rotated_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy rotated NMS: indices of the kept boxes, by descending score.

    Equal scores keep their input order (a stable sort). Runs on the CPU whatever the device of the
    boxes (the greedy pass is sequential); the indices come back on that device.

    Args:
        boxes: ``[N, 5]`` le90 boxes ``(cx, cy, w, h, theta)``.
        scores: ``[N]`` scores.
        iou_threshold: A box is suppressed by a kept box when their IoU is greater than this.

    Returns:
        int64 ``[K]`` indices into ``boxes``.
    """
    return _nms(boxes, scores, None, iou_threshold)


def batched_rotated_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Rotated NMS within each category: boxes of different ``idxs`` never suppress each other.

    Done as separate greedy passes per category (only pairs of the same category are compared), not with
    mmcv's trick of shifting each category's boxes apart by an offset: that trick gives the same keep set
    in exact arithmetic but moves float32 coordinates far from zero and so changes the IoUs slightly.

    Args:
        boxes: ``[N, 5]`` le90 boxes.
        scores: ``[N]`` scores.
        idxs: ``[N]`` integer category of each box.
        iou_threshold: A box is suppressed by a kept box of its category when their IoU is greater than this.

    Returns:
        int64 ``[K]`` indices into ``boxes`` of the kept boxes of all categories, by descending score.
    """
    return _nms(boxes, scores, idxs, iou_threshold)


def _nms(boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float) -> Tensor:
    boxes = _check_2d(boxes, 5, "boxes", "(cx, cy, w, h, theta)")
    device = boxes.device
    scores = torch.as_tensor(scores)
    if scores.shape != (len(boxes),):
        raise ValueError(f"`scores` must have shape [{len(boxes)}] (one per box), got {list(scores.shape)}")
    if idxs is not None:
        idxs = torch.as_tensor(idxs)
        if idxs.shape != (len(boxes),):
            raise ValueError(f"`idxs` must have shape [{len(boxes)}] (one per box), got {list(idxs.shape)}")
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices
    ranked = boxes.detach().cpu().float()[order]
    starts, later = _overlapping_later(ranked, None if idxs is None else idxs.detach().cpu()[order])
    tv_boxes = le90_to_cxcywhr(ranked).numpy()  # torchvision's kernel is called directly, once per kept box
    bounds = starts.tolist()
    suppressed = np.zeros(len(ranked), dtype=bool)
    keep = []
    for i in range(len(ranked)):
        if suppressed[i]:
            continue
        keep.append(i)
        if bounds[i] == bounds[i + 1]:
            continue
        candidates = later[bounds[i]:bounds[i + 1]]
        candidates = candidates[~suppressed[candidates]]
        if len(candidates):
            iou = _iou_kernel(torch.from_numpy(tv_boxes[i:i + 1]), torch.from_numpy(tv_boxes[candidates]))
            suppressed[candidates[iou.numpy()[0] > iou_threshold]] = True
    return order[torch.tensor(keep, dtype=torch.long)].to(device)


def _overlapping_later(ranked: Tensor, categories: Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """For each box (in rank order), the later boxes whose axis-aligned boxes overlap it (and share its category).

    Returned in CSR form: the partners of box ``i`` are ``later[starts[i]:starts[i + 1]]``, ascending.
    Axis-aligned boxes are widened by a hair so that float rounding in the rotated kernel cannot make a
    pair left out here have an IoU above 0. Pairs are found with a uniform grid: every box is listed in the
    cells its axis-aligned box covers, boxes sharing a cell are compared, and a pair is kept only in the
    cell holding the top-left corner of the two boxes' overlap, so that it is found once. With categories,
    each category has its own cells, so the work grows with the pairs within categories only (thousands of
    candidates of many classes over one small image stay cheap).
    """
    n = len(ranked)
    extent_x, extent_y = _extents(ranked.double())
    margin = 1e-4 * (extent_x + extent_y) + 1e-6
    half_x, half_y = extent_x / 2 + margin, extent_y / 2 + margin
    x1, x2 = ranked[:, 0].double() - half_x, ranked[:, 0].double() + half_x
    y1, y2 = ranked[:, 1].double() - half_y, ranked[:, 1].double() + half_y
    origin_x, origin_y = float(x1.min()), float(y1.min())
    span = max(float(x2.max()) - origin_x, float(y2.max()) - origin_y)
    cell = max(2 * float(torch.maximum(x2 - x1, y2 - y1).median()), span / 2**20, 1e-6)  # at most 2**40 cells

    def column(x: Tensor) -> Tensor:
        return torch.floor((x - origin_x) / cell).long()

    def row(y: Tensor) -> Tensor:
        return torch.floor((y - origin_y) / cell).long()

    while True:  # few cells per box: coarser cells when large boxes would be listed in too many
        c1, c2, r1, r2 = column(x1), column(x2), row(y1), row(y2)
        cells_per_box = (c2 - c1 + 1) * (r2 - r1 + 1)
        if int(cells_per_box.sum()) <= 16 * n:
            break
        cell *= 2
    # one entry per (box, covered cell)
    box = torch.arange(n).repeat_interleave(cells_per_box)
    within = torch.arange(len(box)) - (cells_per_box.cumsum(0) - cells_per_box).repeat_interleave(cells_per_box)
    span = (c2 - c1 + 1)[box]
    entry_col, entry_row = c1[box] + within % span, r1[box] + within // span
    key = entry_col * (int(r2.max()) + 1) + entry_row
    if categories is not None:  # a cell per category: boxes of different categories are never paired
        key = (categories.long() - categories.min())[box] * ((int(c2.max()) + 1) * (int(r2.max()) + 1)) + key
    by_cell = torch.argsort(key, stable=True)
    key, box, entry_col, entry_row = key[by_cell], box[by_cell], entry_col[by_cell], entry_row[by_cell]
    group_end = torch.searchsorted(key, key, right=True)
    counts = group_end - torch.arange(len(key)) - 1  # later entries of the same cell
    firsts, seconds = [], []
    start = 0
    while start < len(key):  # about _PAIR_CHUNK candidate pairs at a time
        cum = counts[start:].cumsum(0)
        stop = min(start + max(1, int(torch.searchsorted(cum, torch.tensor(_PAIR_CHUNK), right=True))), len(key))
        part = counts[start:stop]
        p = torch.arange(start, stop).repeat_interleave(part)
        q = p + 1 + torch.arange(len(p)) - (part.cumsum(0) - part).repeat_interleave(part)
        a, b = box[p], box[q]
        hit = (torch.maximum(x1[a], x1[b]) <= torch.minimum(x2[a], x2[b]))
        hit &= torch.maximum(y1[a], y1[b]) <= torch.minimum(y2[a], y2[b])
        hit &= column(torch.maximum(x1[a], x1[b])) == entry_col[p]  # the cell owning the pair
        hit &= row(torch.maximum(y1[a], y1[b])) == entry_row[p]
        a, b = a[hit], b[hit]
        firsts.append(torch.minimum(a, b))
        seconds.append(torch.maximum(a, b))
        start = stop
    first, second = torch.cat(firsts), torch.cat(seconds)
    order = torch.argsort(first * n + second)
    first, second = first[order], second[order]
    starts = torch.zeros(n + 1, dtype=torch.long)
    starts[1:] = torch.bincount(first, minlength=n).cumsum(0)
    return starts.numpy(), second.numpy()
