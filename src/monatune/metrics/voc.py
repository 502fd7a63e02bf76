"""Pascal VOC detection mAP: AP at IoU 0.5 per class, averaged, as the VOC devkit and mmdetection compute it.

torchmetrics' ``MeanAveragePrecision`` was considered: it computes COCO's AP (101 recall points, at most
100 detections per image) and its crowd regions are not VOC's "difficult" objects (a crowd region is
matched by intersection over the detection's area and absorbs any number of detections), so its
``map_50`` is not VOC mAP@0.5. Matching and AP are written here; IoU is torchvision's, state handling
and process synchronisation are torchmetrics'.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchvision.ops import box_iou

__all__ = ["AP_METHODS", "VOCMeanAveragePrecision"]

AP_METHODS = ("11point", "area")
_PRED_KEYS = ("boxes", "scores", "labels")
_TARGET_KEYS = ("boxes", "labels")
_STATES = (
    "pred_boxes", "pred_scores", "pred_labels", "pred_counts",  # counts: detections per image
    "gt_boxes", "gt_labels", "gt_difficult", "gt_counts",  # counts: ground-truth boxes per image
)  # fmt: skip


def _check_settings(num_classes: int, iou_threshold: float, ap_method: str) -> None:
    """Raise ``ValueError`` for a bad class count, IoU threshold or AP method (shared by the mAP metrics)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"`num_classes` must be a positive int, got {num_classes!r}")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"`iou_threshold` must be in (0, 1], got {iou_threshold!r}")
    if ap_method not in AP_METHODS:
        raise ValueError(f"`ap_method` must be one of {AP_METHODS}, got {ap_method!r}")


class VOCMeanAveragePrecision(Metric):
    """Pascal VOC detection mean average precision (mAP@0.5 by default).

    Per class, the detections of all images are sorted by score (descending; a stable sort, so ties keep
    the order in which images and detections were given) and matched greedily, as in the devkit's
    ``voc_eval`` and mmdetection's ``eval_map``: each detection takes the ground-truth box of its image and
    class with the highest IoU; if that IoU is at least ``iou_threshold`` (mmdetection's ``>=``; the devkit
    uses ``>``) the detection is ignored when the box is difficult, a true positive when the box is not yet
    matched (it becomes matched), else a false positive; below the threshold it is a false positive. The
    number of positives is the number of non-difficult boxes of the class. AP is then read off the
    precision/recall curve (``ap_method``), and ``map`` is the mean over the classes that have at least one
    non-difficult box (as mmdetection's ``eval_map``).

    IoU is plain ``torchvision.ops.box_iou`` on the coordinates given. monatune's VOC reader
    (:func:`monatune.data.detection.read_voc`) stores boxes as pixel edges ``xmin - 1, ymin - 1, xmax,
    ymax``, so plain IoU on them equals the devkit's inclusive-pixel IoU (widths ``xmax - xmin + 1``) on the
    raw XML coordinates.

    ``compute`` returns:

    - ``map`` (float scalar): mean AP over the classes with positives; 0 when no class has any.
    - ``map_per_class`` (float ``[num_classes]``): AP of labels ``1..num_classes``; NaN for a class
      without positives. With one class it is 0-d: torchmetrics squeezes one-element results.

    States are flat tensors (all images of an ``update`` concatenated) plus per-image counts, reduced by
    concatenation, so that after a distributed sync (or ``merge_state``) every state is one tensor whose
    images line up across states. Every process must call ``update`` at least once before syncing (an
    image without detections counts): torchmetrics stands in a 1-D float placeholder for a process that
    has none, which the other processes' tensors cannot be gathered with.

    Args:
        num_classes: Number of object classes; labels run ``1..num_classes`` (0, background, never occurs).
        iou_threshold: Smallest IoU, in ``(0, 1]``, at which a detection matches a ground-truth box.
        ap_method: ``"11point"``: the VOC2007 devkit's AP, the mean over recall thresholds ``0, 0.1, ...,
            1`` of the highest precision at a recall at least the threshold (what the Mona release and
            mmdetection report on VOC2007 test; the thresholds are ``numpy.arange(0, 1.1, 0.1)``, so
            ``0.3`` is ``0.30000000000000004``, as there). ``"area"``: the VOC2010+ devkit's AP, the area
            under the monotonically decreasing envelope of the precision/recall curve, at every point.
        **kwargs: Passed to :class:`torchmetrics.Metric` (``dist_sync_on_step``, ``process_group``, ...).

    Example:
        >>> metric = VOCMeanAveragePrecision(num_classes=20)
        >>> preds = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "scores": torch.tensor([0.9]),
        ...           "labels": torch.tensor([3])}]
        >>> targets = [{"boxes": torch.tensor([[12.0, 10.0, 50.0, 52.0]]), "labels": torch.tensor([3]),
        ...             "difficult": torch.tensor([False])}]
        >>> metric.update(preds, targets)
        >>> metric.compute()["map"]
        tensor(1.)
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    pred_boxes: list[Tensor] | Tensor
    pred_scores: list[Tensor] | Tensor
    pred_labels: list[Tensor] | Tensor
    pred_counts: list[Tensor] | Tensor
    gt_boxes: list[Tensor] | Tensor
    gt_labels: list[Tensor] | Tensor
    gt_difficult: list[Tensor] | Tensor
    gt_counts: list[Tensor] | Tensor

    def __init__(
        self, num_classes: int, *, iou_threshold: float = 0.5, ap_method: str = "11point", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        _check_settings(num_classes, iou_threshold, ap_method)
        self.num_classes = num_classes
        self.iou_threshold = float(iou_threshold)
        self.ap_method = ap_method
        for name in _STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> None:
        """Add the detections and ground truth of some images.

        Args:
            preds: Per image, ``boxes`` (float ``[N, 4]``, ``x1, y1, x2, y2``), ``scores`` (``[N]``) and
                ``labels`` (int ``[N]``, in ``1..num_classes``).
            targets: Per image, ``boxes`` (``[M, 4]``), ``labels`` (``[M]``) and optionally ``difficult``
                (bool ``[M]``; all False when absent). Other keys are ignored.
        """
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions and {len(targets)} targets; need one of each per image")
        pred_parts = [_check_pred(pred, i) for i, pred in enumerate(preds)]
        gt_parts = [_check_target(target, i) for i, target in enumerate(targets)]
        pred_boxes, pred_scores, pred_labels = (self._cat([p[k] for p in pred_parts]) for k in range(3))
        gt_boxes, gt_labels, gt_difficult = (self._cat([g[k] for g in gt_parts]) for k in range(3))
        self._check_labels(pred_labels, "prediction")
        self._check_labels(gt_labels, "target")
        self.pred_boxes.append(pred_boxes.reshape(-1, 4).float())
        self.pred_scores.append(pred_scores.float())
        self.pred_labels.append(pred_labels.long())
        self.pred_counts.append(torch.tensor([len(p[0]) for p in pred_parts], dtype=torch.long, device=self.device))
        self.gt_boxes.append(gt_boxes.reshape(-1, 4).float())
        self.gt_labels.append(gt_labels.long())
        self.gt_difficult.append(gt_difficult.bool())
        self.gt_counts.append(torch.tensor([len(g[0]) for g in gt_parts], dtype=torch.long, device=self.device))

    def compute(self) -> dict[str, Tensor]:
        """Match detections to ground truth and average the per-class AP.

        Returns:
            ``{"map": scalar, "map_per_class": [num_classes]}`` (float32; NaN for classes without positives).
        """
        # casts and reshapes are no-ops for states from update; they guard states given to merge_state as a dict
        pred_boxes, gt_boxes = _cat_state(self.pred_boxes).reshape(-1, 4), _cat_state(self.gt_boxes).reshape(-1, 4)
        pred_scores, pred_labels = _cat_state(self.pred_scores), _cat_state(self.pred_labels).long()
        gt_labels, gt_difficult = _cat_state(self.gt_labels).long(), _cat_state(self.gt_difficult).bool()
        pred_counts, gt_counts = _cat_state(self.pred_counts).long(), _cat_state(self.gt_counts).long()

        best_iou, best_gt = _best_matches(pred_boxes, pred_labels, pred_counts, gt_boxes, gt_labels, gt_counts)
        order = _class_then_score_order(pred_labels, pred_scores)
        tp, counted = _greedy_match(best_iou[order], best_gt[order], gt_difficult, self.iou_threshold)
        labels = pred_labels[order]

        ap_fn = _ap_11point if self.ap_method == "11point" else _ap_area
        per_class = torch.full((self.num_classes,), float("nan"), dtype=torch.float64, device=self.device)
        for c in range(1, self.num_classes + 1):
            positives = int(((gt_labels == c) & ~gt_difficult).sum())
            if positives == 0:
                continue
            hits = tp[counted & (labels == c)].double()  # 1: true positive, 0: false positive, in score order
            tp_cum = hits.cumsum(0)
            recall = tp_cum / positives
            precision = tp_cum / torch.arange(1, len(hits) + 1, dtype=torch.float64, device=hits.device)
            per_class[c - 1] = ap_fn(recall, precision)
        present = ~per_class.isnan()
        mean = per_class[present].mean() if present.any() else per_class.new_zeros(())
        return {"map": mean.float(), "map_per_class": per_class.float()}

    def _cat(self, parts: list[Tensor]) -> Tensor:
        return torch.cat(parts).to(self.device) if parts else torch.zeros(0, device=self.device)

    def _check_labels(self, labels: Tensor, kind: str) -> None:
        if len(labels) and (labels.min() < 1 or labels.max() > self.num_classes):
            raise ValueError(f"{kind} labels must be in 1..{self.num_classes} (0 is background), got labels "
                             f"{labels.min().item()}..{labels.max().item()}")  # fmt: skip


def _check_pred(pred: dict[str, Tensor], i: int) -> tuple[Tensor, Tensor, Tensor]:
    """``boxes, scores, labels`` of prediction ``i``, checked."""
    boxes, scores, labels = (_get(pred, key, f"prediction {i}", _PRED_KEYS) for key in _PRED_KEYS)
    boxes = _check_boxes(boxes, f"prediction {i}")
    if scores.shape != (len(boxes),) or labels.shape != (len(boxes),):
        raise ValueError(f"prediction {i} has {len(boxes)} boxes, so `scores` and `labels` must have shape "
                         f"[{len(boxes)}], got {list(scores.shape)} and {list(labels.shape)}")  # fmt: skip
    return boxes, scores, labels


def _check_target(target: dict[str, Tensor], i: int) -> tuple[Tensor, Tensor, Tensor]:
    """``boxes, labels, difficult`` of target ``i``, checked (``difficult`` all False when absent)."""
    boxes, labels = (_get(target, key, f"target {i}", _TARGET_KEYS) for key in _TARGET_KEYS)
    boxes = _check_boxes(boxes, f"target {i}")
    difficult = torch.as_tensor(target.get("difficult", torch.zeros(len(boxes), dtype=torch.bool)))
    if labels.shape != (len(boxes),) or difficult.shape != (len(boxes),):
        raise ValueError(f"target {i} has {len(boxes)} boxes, so `labels` and `difficult` must have shape "
                         f"[{len(boxes)}], got {list(labels.shape)} and {list(difficult.shape)}")  # fmt: skip
    return boxes, labels, difficult.to(labels.device)


def _get(item: dict[str, Tensor], key: str, name: str, keys: tuple[str, ...]) -> Tensor:
    if not isinstance(item, dict) or key not in item:
        raise ValueError(f"{name} must be a dict with {', '.join(map(repr, keys))}; it has no {key!r}")
    return torch.as_tensor(item[key])


def _check_boxes(boxes: Tensor, name: str) -> Tensor:
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}: `boxes` must have shape [N, 4] (x1, y1, x2, y2), got {list(boxes.shape)}")
    return boxes


def _cat_state(state: list[Tensor] | Tensor) -> Tensor:
    """A list state (before sync) or tensor state (after sync) as one tensor; empty before any update."""
    return dim_zero_cat(state) if isinstance(state, Tensor) or state else torch.zeros(0)


def _best_matches(
    pred_boxes: Tensor, pred_labels: Tensor, pred_counts: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
    gt_counts: Tensor,
) -> tuple[Tensor, Tensor]:
    """Per detection: the highest IoU with a ground-truth box of its image and class, and that box's index.

    A detection without such a box gets IoU -1 (the index is then meaningless). Ties go to the first box,
    as ``numpy.argmax`` in the devkit.
    """
    best_iou = torch.full((len(pred_boxes),), -1.0, dtype=torch.float32, device=pred_boxes.device)
    best_gt = torch.zeros(len(pred_boxes), dtype=torch.long, device=pred_boxes.device)
    pred_starts = (pred_counts.cumsum(0) - pred_counts).tolist()
    gt_starts = (gt_counts.cumsum(0) - gt_counts).tolist()
    for p0, n_pred, g0, n_gt in zip(pred_starts, pred_counts.tolist(), gt_starts, gt_counts.tolist()):
        if n_pred == 0 or n_gt == 0:
            continue
        dets, gts = slice(p0, p0 + n_pred), slice(g0, g0 + n_gt)
        iou = box_iou(pred_boxes[dets], gt_boxes[gts])  # n_pred, n_gt
        iou[pred_labels[dets, None] != gt_labels[None, gts]] = -1.0
        best_iou[dets], best_gt[dets] = iou.max(dim=1)
        best_gt[dets] += g0
    return best_iou, best_gt


def _class_then_score_order(labels: Tensor, scores: Tensor) -> Tensor:
    """Detection indices sorted by class, then by score descending; ties keep their input order."""
    by_score = torch.sort(scores, descending=True, stable=True).indices
    return by_score[torch.sort(labels[by_score], stable=True).indices]


def _greedy_match(best_iou: Tensor, best_gt: Tensor, gt_difficult: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Which detections, in matching order, are true positives, and which count (are not on a difficult box).

    The devkit's loop (a matched box turns later matches into false positives) amounts to: a detection is a
    true positive when it reaches the threshold on a non-difficult box and is the first to do so.
    """
    if len(gt_difficult) == 0:  # no ground truth at all: every detection is a false positive
        return torch.zeros_like(best_iou, dtype=torch.bool), torch.ones_like(best_iou, dtype=torch.bool)
    hit = best_iou >= threshold
    on_difficult = hit & gt_difficult[best_gt]
    match = hit & ~on_difficult
    position = torch.arange(len(best_gt), device=best_gt.device)
    first = torch.full((len(gt_difficult),), len(best_gt), dtype=torch.long, device=best_gt.device)
    first = first.scatter_reduce(0, best_gt[match], position[match], reduce="amin")  # earliest match per box
    return match & (first[best_gt] == position), ~on_difficult


def _ap_11point(recall: Tensor, precision: Tensor) -> Tensor:
    """VOC2007: mean over recall thresholds 0, 0.1, ..., 1 of the highest precision at recall >= threshold."""
    thresholds = torch.arange(11, dtype=torch.float64, device=recall.device) * 0.1  # = numpy.arange(0, 1.1, 0.1)
    if len(recall) == 0:
        return thresholds.new_zeros(())
    reached = recall[None, :] >= thresholds[:, None]  # 11, N
    return torch.where(reached, precision[None, :], 0.0).amax(dim=1).mean()


def _ap_area(recall: Tensor, precision: Tensor) -> Tensor:
    """VOC2010+: area under the monotonically decreasing precision envelope, at every recall step."""
    zero, one = recall.new_zeros(1), recall.new_ones(1)
    recall = torch.cat([zero, recall, one])
    envelope = torch.cat([zero, precision, zero]).flip(0).cummax(0).values.flip(0)
    return ((recall[1:] - recall[:-1]) * envelope[1:]).sum()
