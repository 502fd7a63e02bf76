"""Oriented-box detection mAP as mmrotate and the DOTA devkit compute it, and DOTA Task1 submission files.

- :class:`RotatedMeanAveragePrecision`: mmrotate's ``eval_rbbox_map`` (what STAR-MMRotate reports, DOTA
  patches and STAR images alike): rotated-rectangle IoU ``>= 0.5``, every ground-truth box counts.
- :func:`dota_devkit_map`: the DOTA devkit's ``dota_evaluation_task1.voc_eval`` (the official server's rule):
  polygon IoU ``> 0.5``, difficult objects neither help nor hurt.
- :func:`write_task1` / :func:`task1_detections` / :func:`le90_to_submission_polygons`: mmrotate's
  ``DOTADataset._results2submission`` (one ``Task1_<class>.txt`` per class, zipped).

torchmetrics' ``MeanAveragePrecision`` knows axis-aligned boxes and masks only, so matching and AP are
monatune's own (shared with :mod:`.voc`); rotated IoU is torchvision's kernel, polygon IoU monatune's exact
clipping (:mod:`monatune.ops`), state handling and process synchronisation torchmetrics'.
"""
from __future__ import annotations

import io
import zipfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from ..atomic import write_file
from ..ops import le90_to_polygons, polygon_iou, rotated_box_iou
from .voc import (
    _ap_11point,
    _ap_area,
    _cat_state,
    _check_settings,
    _class_then_score_order,
    _greedy_match,
)

__all__ = [
    "RotatedMeanAveragePrecision", "dota_devkit_map", "le90_to_submission_polygons", "task1_detections",
    "write_task1",
]  # fmt: skip

Detections = Mapping[str, Sequence[tuple[str, float, Sequence[float]]]]  # class -> (image id, score, polygon)
GroundTruth = Mapping[str, Sequence[tuple[Sequence[float], str, int]]]  # image id -> (polygon, class, difficult)
_STATES = (
    "pred_boxes", "pred_scores", "pred_labels", "pred_counts",  # counts: detections per image
    "gt_boxes", "gt_labels", "gt_counts",  # counts: ground-truth boxes per image
)  # fmt: skip


class RotatedMeanAveragePrecision(Metric):
    """Mean AP of oriented (le90) boxes, as mmrotate's ``eval_rbbox_map`` computes it.

    Per class, each detection takes the ground-truth box of its image and class with the highest
    rotated-rectangle IoU (``monatune.ops.rotated_box_iou``, torchvision's kernel); in descending score it is
    a true positive if that IoU is at least ``iou_threshold`` and the box is not yet covered (it becomes
    covered), otherwise a false positive. Every ground-truth box counts: STAR-MMRotate's DOTA and STAR
    datasets load with ``difficulty=100``, so nothing is ignored (a ``difficult`` key in the targets is
    ignored too). Equal scores keep the order images and detections were given in (mmrotate's
    ``np.argsort`` leaves their order unspecified). AP is VOC07's 11-point AP by default (mmrotate's
    ``use_07_metric=True``) and ``map`` the mean over the classes with at least one ground-truth box.

    ``compute`` returns ``{"map": scalar, "ap_per_class": [num_classes]}`` (float32; NaN for a class without
    ground truth; with one class ``ap_per_class`` is 0-d, as torchmetrics squeezes one-element results).

    States are flat tensors plus per-image counts, reduced by concatenation, so they line up after a
    distributed sync or ``merge_state``; every process must call ``update`` at least once before syncing.

    Args:
        num_classes: Number of classes; labels run ``1..num_classes``.
        iou_threshold: Smallest IoU, in ``(0, 1]``, at which a detection matches (mmrotate's ``>=``).
        ap_method: ``"11point"`` (VOC07, mmrotate's default here) or ``"area"`` (area under the envelope).
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = RotatedMeanAveragePrecision(num_classes=15)
        >>> box = torch.tensor([[50.0, 50.0, 40.0, 20.0, 0.3]])
        >>> metric.update([{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([2])}],
        ...               [{"boxes": box, "labels": torch.tensor([2])}])
        >>> metric.compute()["map"]
        tensor(1.)
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

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
            preds: Per image, ``boxes`` (float ``[N, 5]``, le90 ``cx, cy, w, h, theta``), ``scores`` (``[N]``)
                and ``labels`` (int ``[N]`` in ``1..num_classes``).
            targets: Per image, ``boxes`` (``[M, 5]``, le90) and ``labels`` (``[M]``); other keys are ignored.
        """
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions and {len(targets)} targets; need one of each per image")
        pred_keys, target_keys = ("boxes", "scores", "labels"), ("boxes", "labels")
        pred_parts = [_check_item(pred, f"prediction {i}", pred_keys) for i, pred in enumerate(preds)]
        gt_parts = [_check_item(target, f"target {i}", target_keys) for i, target in enumerate(targets)]
        boxes, scores, labels = (self._cat([p[k] for p in pred_parts]) for k in range(3))
        gt_boxes, gt_labels = (self._cat([g[k] for g in gt_parts]) for k in range(2))
        self._check_labels(labels, "prediction")
        self._check_labels(gt_labels, "target")
        self.pred_boxes.append(boxes.reshape(-1, 5).float())
        self.pred_scores.append(scores.float())
        self.pred_labels.append(labels.long())
        self.pred_counts.append(torch.tensor([len(p[0]) for p in pred_parts], dtype=torch.long, device=self.device))
        self.gt_boxes.append(gt_boxes.reshape(-1, 5).float())
        self.gt_labels.append(gt_labels.long())
        self.gt_counts.append(torch.tensor([len(g[0]) for g in gt_parts], dtype=torch.long, device=self.device))

    def compute(self) -> dict[str, Tensor]:
        """Match detections to ground truth and average the per-class AP.

        Returns:
            ``{"map": scalar, "ap_per_class": [num_classes]}`` (float32; NaN for classes without ground truth).
        """
        pred_boxes, gt_boxes = _cat_state(self.pred_boxes).reshape(-1, 5), _cat_state(self.gt_boxes).reshape(-1, 5)
        pred_scores, pred_labels = _cat_state(self.pred_scores), _cat_state(self.pred_labels).long()
        gt_labels = _cat_state(self.gt_labels).long()
        pred_counts, gt_counts = _cat_state(self.pred_counts).long(), _cat_state(self.gt_counts).long()

        best_iou, best_gt = _best_matches(pred_boxes, pred_labels, pred_counts, gt_boxes, gt_labels, gt_counts)
        order = _class_then_score_order(pred_labels, pred_scores)
        no_difficult = torch.zeros(len(gt_labels), dtype=torch.bool, device=gt_labels.device)
        tp, _ = _greedy_match(best_iou[order], best_gt[order], no_difficult, self.iou_threshold)
        labels = pred_labels[order]

        ap_fn = _ap_11point if self.ap_method == "11point" else _ap_area
        per_class = torch.full((self.num_classes,), float("nan"), dtype=torch.float64, device=self.device)
        for c in range(1, self.num_classes + 1):
            positives = int((gt_labels == c).sum())
            if positives == 0:
                continue
            hits = tp[labels == c].double()  # 1: true positive, 0: false positive, in score order
            tp_cum = hits.cumsum(0)
            precision = tp_cum / torch.arange(1, len(hits) + 1, dtype=torch.float64, device=hits.device)
            per_class[c - 1] = ap_fn(tp_cum / positives, precision)
        present = ~per_class.isnan()
        mean = per_class[present].mean() if present.any() else per_class.new_zeros(())
        return {"map": mean.float(), "ap_per_class": per_class.float()}

    def _cat(self, parts: list[Tensor]) -> Tensor:
        return torch.cat(parts).to(self.device) if parts else torch.zeros(0, device=self.device)

    def _check_labels(self, labels: Tensor, kind: str) -> None:
        if len(labels) and (labels.min() < 1 or labels.max() > self.num_classes):
            raise ValueError(f"{kind} labels must be in 1..{self.num_classes}, got labels "
                             f"{labels.min().item()}..{labels.max().item()}")  # fmt: skip


def _check_item(item: dict[str, Tensor], name: str, keys: tuple[str, ...]) -> list[Tensor]:
    """The ``keys`` of one image's prediction or target, checked: boxes ``[N, 5]``, the rest ``[N]``."""
    if not isinstance(item, dict) or any(key not in item for key in keys):
        missing = [key for key in keys if not isinstance(item, dict) or key not in item]
        raise ValueError(f"{name} must be a dict with {', '.join(map(repr, keys))}; it has no {missing[0]!r}")
    boxes, *rest = (torch.as_tensor(item[key]) for key in keys)
    boxes = boxes.reshape(0, 5) if boxes.numel() == 0 else boxes
    if boxes.ndim != 2 or boxes.shape[1] != 5:
        raise ValueError(f"{name}: `boxes` must have shape [N, 5] (le90 cx, cy, w, h, theta), got {list(boxes.shape)}")
    for key, value in zip(keys[1:], rest):
        if value.shape != (len(boxes),):
            raise ValueError(f"{name} has {len(boxes)} boxes, so `{key}` must have shape [{len(boxes)}], "
                             f"got {list(value.shape)}")  # fmt: skip
    return [boxes, *rest]


def _best_matches(
    pred_boxes: Tensor, pred_labels: Tensor, pred_counts: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
    gt_counts: Tensor,
) -> tuple[Tensor, Tensor]:
    """Per detection: the highest rotated IoU with a box of its image and class (-1 if none), and that box."""
    best_iou = torch.full((len(pred_boxes),), -1.0, dtype=torch.float32, device=pred_boxes.device)
    best_gt = torch.zeros(len(pred_boxes), dtype=torch.long, device=pred_boxes.device)
    pred_starts = (pred_counts.cumsum(0) - pred_counts).tolist()
    gt_starts = (gt_counts.cumsum(0) - gt_counts).tolist()
    for p0, n_pred, g0, n_gt in zip(pred_starts, pred_counts.tolist(), gt_starts, gt_counts.tolist()):
        if n_pred == 0 or n_gt == 0:
            continue
        dets, gts = slice(p0, p0 + n_pred), slice(g0, g0 + n_gt)
        iou = rotated_box_iou(pred_boxes[dets], gt_boxes[gts]).to(pred_boxes.device)  # n_pred, n_gt
        iou[pred_labels[dets, None] != gt_labels[None, gts]] = -1.0
        best_iou[dets], best_gt[dets] = iou.max(dim=1)
        best_gt[dets] += g0
    return best_iou, best_gt


# ---- the DOTA devkit's evaluation (dota_evaluation_task1.py) ----


def dota_devkit_map(
    detections: Detections, ground_truth: GroundTruth, classes: Sequence[str], *, iou_threshold: float = 0.5
) -> dict[str, Any]:
    """Mean AP as the DOTA devkit's ``dota_evaluation_task1.py`` computes it (VOC07 11-point, polygon IoU).

    Per class, detections are taken in descending score (a stable sort; the devkit's ``np.argsort`` leaves
    ties unspecified). Each takes the ground-truth polygon of its image and class with the highest IoU
    (the first on ties). If that IoU is greater than ``iou_threshold`` (strictly, unlike mmrotate) the
    detection is ignored when the object is difficult, a true positive when the object is not yet
    matched, else a false positive; otherwise it is a false positive. Difficult objects (flag ``!= 0``, as
    the devkit reads ``int(flag)`` as a bool; split patches mark truncated objects 2) are not positives.
    IoU is exact polygon IoU in float64 (the devkit's ``polyiou``; its axis-aligned pre-filter changes
    nothing); ground-truth polygons may be non-convex, detections must be convex (rectangles are). A
    class without positives gets AP 0 and still counts in the mean over ``classes``, as in the devkit.

    Args:
        detections: Class name -> list of ``(image_id, score, polygon)`` with ``polygon`` 8 numbers
            ``x1, y1, ..., x4, y4`` (what ``Task1_<class>.txt`` holds; see :func:`task1_detections`).
        ground_truth: Image id -> list of ``(polygon, class name, difficult)``, every evaluated image
            present (an image without objects maps to an empty list).
        classes: The class names to evaluate, e.g. DOTA-v1.0's 15; detections and objects of other classes
            are not looked at (the devkit reads only the listed classes' files).
        iou_threshold: A detection matches when its IoU is greater than this.

    Returns:
        ``{"map": float, "ap_per_class": {class name: float}}``.
    """
    ap_per_class = {}
    for name in classes:
        ap_per_class[name] = _devkit_class_ap(detections.get(name, ()), ground_truth, name, iou_threshold)
    return {"map": float(np.mean(list(ap_per_class.values()))) if classes else 0.0, "ap_per_class": ap_per_class}


def _devkit_class_ap(
    dets: Sequence[tuple[str, float, Sequence[float]]], ground_truth: GroundTruth, name: str, threshold: float
) -> float:
    objects = {image: [obj for obj in objs if obj[1] == name] for image, objs in ground_truth.items()}
    positives = sum(int(obj[2]) == 0 for objs in objects.values() for obj in objs)
    if not dets:
        return 0.0
    missing = sorted({det[0] for det in dets} - set(objects), key=str)
    if missing:
        raise ValueError(f"detections of class {name!r} on images {missing[:5]} that `ground_truth` does not "
                         f"have; list every evaluated image there (with [] if it has no objects)")  # fmt: skip
    scores = np.array([float(det[1]) for det in dets])
    order = np.argsort(-scores, kind="stable")
    # best ground-truth object of every detection, one polygon-IoU matrix per image
    best_iou, best_obj = np.full(len(dets), -np.inf), np.zeros(len(dets), dtype=np.int64)
    by_image: dict[str, list[int]] = defaultdict(list)
    for k, det in enumerate(dets):
        by_image[det[0]].append(k)
    for image, members in by_image.items():
        if not objects[image]:
            continue
        gt_polys = torch.tensor([obj[0] for obj in objects[image]], dtype=torch.float64).reshape(-1, 8)
        det_polys = torch.tensor([dets[k][2] for k in members], dtype=torch.float64).reshape(-1, 8)
        iou = polygon_iou(gt_polys, det_polys).numpy()  # objects, detections
        best_iou[members], best_obj[members] = iou.max(0), iou.argmax(0)
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    matched: set[tuple[str, int]] = set()
    for rank, k in enumerate(order):
        image = dets[k][0]
        if best_iou[k] > threshold:
            if int(objects[image][best_obj[k]][2]) != 0:
                continue  # a difficult object: neither
            if (image, best_obj[k]) not in matched:
                tp[rank] = 1.0
                matched.add((image, best_obj[k]))
            else:
                fp[rank] = 1.0
        else:
            fp[rank] = 1.0
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    if positives == 0:
        return 0.0  # the devkit divides by zero: recall NaN, AP 0
    recall, precision = tp / positives, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return float(_ap_11point(torch.from_numpy(recall), torch.from_numpy(precision)))


# ---- DOTA Task1 submission files (mmrotate's DOTADataset._results2submission) ----


def le90_to_submission_polygons(boxes: Tensor) -> Tensor:
    """Corners of le90 boxes for a DOTA submission: started at the corner nearest the top-left.

    The corners of :func:`monatune.ops.le90_to_polygons` are rotated cyclically (order kept) so that the
    sum of distances from corner ``k`` to corner ``k`` of the box's axis-aligned bounding box (top-left,
    top-right, bottom-right, bottom-left) is smallest; on ties the earliest start wins (mmrotate's
    ``obb2poly_np_le90`` + ``get_best_begin_point``).

    Args:
        boxes: ``[N, 5]`` le90 boxes.

    Returns:
        ``[N, 8]`` corners in the boxes' dtype (distances compared in float64).
    """
    corners = le90_to_polygons(boxes).reshape(-1, 4, 2)
    points = corners.double()
    lo, hi = points.amin(1), points.amax(1)
    targets = torch.stack([lo, torch.stack([hi[:, 0], lo[:, 1]], -1), hi, torch.stack([lo[:, 0], hi[:, 1]], -1)], 1)
    starts = torch.arange(4, device=corners.device)
    rolled = (starts[:, None] + starts[None]) % 4  # start s: corners s, s + 1, ...
    cost = (points[:, rolled] - targets[:, None]).norm(dim=-1).sum(-1)  # N, 4
    best = cost.argmin(dim=1)  # the first of equal costs
    return corners[torch.arange(len(corners))[:, None], rolled[best]].reshape(-1, 8)


def task1_detections(
    predictions: Mapping[str, dict[str, Tensor]], classes: Sequence[str]
) -> dict[str, list[tuple[str, float, list[float]]]]:
    """Per-image le90 predictions as DOTA Task1 detections (what :func:`write_task1` and
    :func:`dota_devkit_map` take), polygons from :func:`le90_to_submission_polygons`.

    Args:
        predictions: Image id (file stem, no extension) -> ``{"boxes": [N, 5] le90, "scores": [N],
            "labels": [N] in 1..len(classes)}``, in the order the lines should be written.
        classes: Class names; label ``k`` is ``classes[k - 1]``.

    Returns:
        Class name -> list of ``(image_id, score, polygon)``; every class present, maybe empty.
    """
    detections: dict[str, list[tuple[str, float, list[float]]]] = {name: [] for name in classes}
    for image_id, pred in predictions.items():
        boxes, scores, labels = _check_item(pred, f"prediction for {image_id!r}", ("boxes", "scores", "labels"))
        if len(labels) and (int(labels.min()) < 1 or int(labels.max()) > len(classes)):
            raise ValueError(f"prediction for {image_id!r}: labels must be in 1..{len(classes)}, got "
                             f"{int(labels.min())}..{int(labels.max())}")  # fmt: skip
        polygons = le90_to_submission_polygons(boxes.detach().cpu()).tolist()
        for label, score, polygon in zip(labels.tolist(), scores.detach().cpu().tolist(), polygons):
            detections[classes[label - 1]].append((image_id, float(score), polygon))
    return detections


def write_task1(detections: Detections, out_dir: str | Path, classes: Sequence[str]) -> Path:
    """Write ``Task1_<class>.txt`` for every class and ``Task1.zip`` of them into ``out_dir``.

    Each line is ``<image_id> <score> x1 y1 x2 y2 x3 y3 x4 y4``: the score as Python's ``repr`` of the float
    (every digit, as mmrotate's ``str`` of a numpy float), coordinates with 2 decimals. A class without
    detections gets an empty file. Every file is written beside its destination and renamed into place, so
    an interrupted run leaves each file whole (old or new).

    Args:
        detections: Class name -> list of ``(image_id, score, polygon)``; see :func:`task1_detections`.
        out_dir: Folder to write into (created if missing).
        classes: All class names, in the order the zip lists them.

    Returns:
        The path of ``Task1.zip``.
    """
    unknown = sorted(set(detections) - set(classes))
    if unknown:
        raise ValueError(f"detections for classes {unknown} that are not in `classes` {list(classes)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in classes:
            lines = []
            for image_id, score, polygon in detections.get(name, ()):
                if len(polygon) != 8:
                    raise ValueError(f"class {name!r}, image {image_id!r}: a polygon needs 8 numbers, "
                                     f"got {len(polygon)}")  # fmt: skip
                coordinates = (f"{float(p):.2f}" for p in polygon)
                lines.append(" ".join([str(image_id), repr(float(score)), *coordinates]) + "\n")
            data = "".join(lines).encode()
            write_file(out_dir / f"Task1_{name}.txt", data, sync_directory=False)
            zf.writestr(zipfile.ZipInfo(f"Task1_{name}.txt", date_time=(1980, 1, 1, 0, 0, 0)), data,
                        compress_type=zipfile.ZIP_DEFLATED)  # fmt: skip
    write_file(out_dir / "Task1.zip", archive.getvalue())
    return out_dir / "Task1.zip"
