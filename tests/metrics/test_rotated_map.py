"""Rotated mAP (mmrotate's eval_rbbox_map) and DOTA devkit mAP against hand-worked cases and ports of the
reference code on random data; DOTA Task1 submission files against mmrotate's rules."""
from __future__ import annotations

import math
import zipfile

import numpy as np
import pytest
import torch
from torchmetrics.utilities import dim_zero_cat

from monatune.metrics import (
    RotatedMeanAveragePrecision,
    dota_devkit_map,
    le90_to_submission_polygons,
    task1_detections,
    write_task1,
)
from monatune.ops import le90_to_polygons, polygon_iou, rotated_box_iou

DOTA_CLASSES = ("plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle", "large-vehicle",
                "ship", "tennis-court", "basketball-court", "storage-tank", "soccer-ball-field", "roundabout",
                "harbor", "swimming-pool", "helicopter")  # fmt: skip


def _pred(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 5), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.long)}  # fmt: skip


def _target(boxes, labels, **extra):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 5),
            "labels": torch.tensor(labels, dtype=torch.long), **extra}  # fmt: skip


def _rotated(preds, targets, num_classes=1, **kwargs):
    metric = RotatedMeanAveragePrecision(num_classes, **kwargs)
    metric.update(preds, targets)
    return metric.compute()


# ---- mmrotate's eval_rbbox_map, by hand ----
# One class, two images, three rotated ground-truth boxes (A: g1, g2; B: g3), five detections out of order.
#   rank  score  image  box                                   IoU       outcome
#   1     0.9    A      g1 turned by 45 degrees               0.7071    TP (g1 covered)
#   2     0.8    B      far away                              0         FP
#   3     0.7    A      = g1                                  1         FP (g1 already covered)
#   4     0.6    B      = g3                                  1         TP
#   5     0.5    A      g2 (12 x 12) moved 4 along x          96/192    TP (IoU >= 0.5, mmrotate's rule)
# cum TP 1 1 1 2 3, FP 0 1 2 2 2: recall 1/3 1/3 1/3 2/3 1, precision 1 1/2 1/3 1/2 3/5.
# 11-point: t = 0 .. .3 -> 1 (4 thresholds), t = .4 .. 1 -> 3/5 (7): AP = 8.2 / 11. Area: 1/3 + 0.4.
G1, G2, G3 = [0.0, 0.0, 10.0, 10.0, 0.3], [50.0, 50.0, 12.0, 12.0, 0.0], [0.0, 0.0, 20.0, 8.0, 0.5]
HAND_PREDS = [
    _pred([[54.0, 50.0, 12.0, 12.0, 0.0], G1, [0.0, 0.0, 10.0, 10.0, 0.3 + math.pi / 4]], [0.5, 0.7, 0.9], [1, 1, 1]),
    _pred([G3, [100.0, 100.0, 5.0, 5.0, 0.0]], [0.6, 0.8], [1, 1]),
]
HAND_TARGETS = [_target([G1, G2], [1, 1]), _target([G3], [1])]


def test_hand_case_ious_are_what_the_table_says():
    iou = rotated_box_iou(HAND_PREDS[0]["boxes"], HAND_TARGETS[0]["boxes"])
    torch.testing.assert_close(iou, torch.tensor([[0.0, 0.5], [1.0, 0.0], [math.sqrt(0.5), 0.0]]))
    assert iou[0, 1].item() == 0.5  # exactly, so the >= rule is what decides


@pytest.mark.parametrize("ap_method, expected", [("11point", 8.2 / 11), ("area", 1 / 3 + 0.4)])
def test_hand_computed_ap(ap_method, expected):
    result = _rotated(HAND_PREDS, HAND_TARGETS, ap_method=ap_method)
    assert result["map"].item() == pytest.approx(expected, abs=1e-6)
    assert result["ap_per_class"].item() == pytest.approx(expected, abs=1e-6)


def test_iou_at_the_threshold_matches_and_above_it_does_not():
    # rank 5 (IoU exactly 0.5) becomes an FP: TP FP FP TP FP -> recall stops at 2/3, AP (4 + 3 * 0.5) / 11
    assert _rotated(HAND_PREDS, HAND_TARGETS, iou_threshold=0.51)["map"].item() == pytest.approx(5.5 / 11)


def test_difficult_flags_are_ignored_every_box_counts():
    flagged = [_target([G1, G2], [1, 1], difficult=torch.tensor([True, True])), HAND_TARGETS[1]]
    assert _rotated(HAND_PREDS, flagged)["map"].item() == pytest.approx(8.2 / 11, abs=1e-6)


def test_classes_without_ground_truth_are_nan_and_left_out_of_the_mean():
    preds = [_pred([G1, G2], [0.9, 0.8], [1, 2])]
    targets = [_target([G1, [200.0, 200.0, 10.0, 4.0, 0.1]], [1, 3])]
    result = _rotated(preds, targets, num_classes=3)
    assert result["ap_per_class"][[0, 2]].tolist() == [1.0, 0.0]  # class 3 has a box and no detection
    assert result["ap_per_class"][1].isnan()  # class 2: a detection only
    assert result["map"].item() == 0.5
    nothing = _rotated([_pred([G1], [0.9], [1])], [_target([], [])], num_classes=2)
    assert nothing["map"].item() == 0.0 and nothing["ap_per_class"].isnan().all()


# ---- against a port of mmrotate's eval_rbbox_map (tpfp_default + average_precision) ----


def mmrotate_eval_map(det_results, annotations, num_classes, use_07_metric=True, iou_thr=0.5):
    """``det_results[i][c]``: ``[n, 6]`` (le90 box, score); ``annotations[i]``: bboxes ``[m, 5]``, labels 0..C-1."""
    aps, num_gts_all = [], []
    for c in range(num_classes):
        tps, fps, dets = [], [], []
        num_gts = 0
        for det, ann in zip(det_results, annotations):
            det = det[c]
            gt = ann["bboxes"][ann["labels"] == c]
            num_gts += len(gt)
            tp, fp = np.zeros(len(det)), np.zeros(len(det))
            if len(gt) == 0:
                fp[:] = 1
            elif len(det):
                ious = rotated_box_iou(torch.from_numpy(det[:, :5]).float(), torch.from_numpy(gt).float()).numpy()
                ious_max, ious_argmax = ious.max(axis=1), ious.argmax(axis=1)
                covered = np.zeros(len(gt), dtype=bool)
                for i in np.argsort(-det[:, -1], kind="stable"):
                    if ious_max[i] >= iou_thr:
                        if not covered[ious_argmax[i]]:
                            covered[ious_argmax[i]] = True
                            tp[i] = 1
                        else:
                            fp[i] = 1
                    else:
                        fp[i] = 1
            tps.append(tp), fps.append(fp), dets.append(det)
        dets = np.vstack([d.reshape(-1, 6) for d in dets])
        order = np.argsort(-dets[:, -1], kind="stable")
        tp, fp = np.cumsum(np.hstack(tps)[order]), np.cumsum(np.hstack(fps)[order])
        eps = np.finfo(np.float32).eps
        recalls, precisions = tp / max(num_gts, eps), tp / np.maximum(tp + fp, eps)
        ap = 0.0
        if use_07_metric:
            for thr in np.arange(0, 1 + 1e-3, 0.1):
                precs = precisions[recalls >= thr]
                ap += precs.max() if precs.size > 0 else 0
            ap /= 11
        else:
            mrec = np.concatenate([[0], recalls, [1]])
            mpre = np.concatenate([[0], precisions, [0]])
            for i in range(len(mpre) - 1, 0, -1):
                mpre[i - 1] = max(mpre[i - 1], mpre[i])
            ind = np.where(mrec[1:] != mrec[:-1])[0]
            ap = np.sum((mrec[ind + 1] - mrec[ind]) * mpre[ind + 1])
        aps.append(ap), num_gts_all.append(num_gts)
    per_class = [ap if n > 0 else float("nan") for ap, n in zip(aps, num_gts_all)]
    present = [ap for ap, n in zip(aps, num_gts_all) if n > 0]
    return (float(np.mean(present)) if present else 0.0), per_class


def _random_rotated_case(seed, num_images=10, num_classes=4):
    """Rotated ground truth (the last class never has any) and jittered, relabelled, duplicated detections."""
    rng = np.random.default_rng(seed)
    preds, targets, det_results, annotations = [], [], [], []
    for _ in range(num_images):
        n = int(rng.integers(0, 7))
        gt = np.concatenate([rng.uniform(20, 180, (n, 2)), rng.uniform(8, 40, (n, 2)),
                             rng.uniform(-np.pi / 2, np.pi / 2, (n, 1))], axis=1).astype(np.float32)  # fmt: skip
        classes = rng.integers(1, num_classes, size=n)
        again = rng.random(n) < 0.3
        copies = np.concatenate([gt, gt[again]]).reshape(-1, 5)
        labels = np.concatenate([classes, classes[again]])
        found = copies + rng.normal(0, 1, copies.shape) * np.array([3, 3, 3, 3, 0.15])
        found[:, 2:4] = np.abs(found[:, 2:4]) + 1
        labels = np.where(rng.random(len(labels)) < 0.15, rng.integers(1, num_classes + 1, len(labels)), labels)
        m = int(rng.integers(0, 4))
        clutter = np.concatenate([rng.uniform(20, 180, (m, 2)), rng.uniform(8, 40, (m, 2)),
                                  rng.uniform(-1.5, 1.5, (m, 1))], 1)  # fmt: skip
        boxes = np.concatenate([found, clutter]).astype(np.float32)
        det_labels = np.concatenate([labels, rng.integers(1, num_classes + 1, m)])
        scores = rng.random(len(boxes)).astype(np.float32)
        preds.append(_pred(boxes.tolist(), scores.tolist(), det_labels.tolist()))
        targets.append(_target(gt.tolist(), classes.tolist()))
        with_scores = np.concatenate([boxes, scores[:, None]], 1)
        det_results.append([with_scores[det_labels == c + 1] for c in range(num_classes)])
        annotations.append({"bboxes": gt, "labels": classes - 1})
    return preds, targets, det_results, annotations


@pytest.mark.parametrize("ap_method", ["11point", "area"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_mmrotate_eval_map_on_random_data(seed, ap_method):
    preds, targets, det_results, annotations = _random_rotated_case(seed)
    expected_map, expected = mmrotate_eval_map(det_results, annotations, 4, use_07_metric=ap_method == "11point")
    result = _rotated(preds, targets, num_classes=4, ap_method=ap_method)
    assert result["ap_per_class"].tolist() == pytest.approx(expected, abs=1e-6, nan_ok=True)
    assert result["map"].item() == pytest.approx(expected_map, abs=1e-6)
    assert 0.05 < expected_map < 0.95 and math.isnan(expected[-1])  # neither trivial nor hopeless; a class without GT


def test_updates_in_parts_merged_metrics_and_synced_states_give_the_same_result():
    preds, targets, _, _ = _random_rotated_case(7)
    whole = _rotated(preds, targets, num_classes=4)
    in_parts = RotatedMeanAveragePrecision(4)
    for k in range(0, len(preds), 3):
        in_parts.update(preds[k:k + 3], targets[k:k + 3])
    in_parts.update([], [])
    first, second = RotatedMeanAveragePrecision(4), RotatedMeanAveragePrecision(4)
    first.update(preds[:6], targets[:6])
    second.update(preds[6:], targets[6:])
    first.merge_state(second)
    synced = RotatedMeanAveragePrecision(4)
    synced.update(preds[:4], targets[:4])
    synced.update(preds[4:], targets[4:])
    for name in synced._defaults:
        setattr(synced, name, dim_zero_cat(getattr(synced, name)))  # after a sync each state is one tensor
    for metric in (in_parts, first, synced):
        result = metric.compute()
        torch.testing.assert_close(result["ap_per_class"], whole["ap_per_class"], equal_nan=True)
        torch.testing.assert_close(result["map"], whole["map"])


@pytest.mark.parametrize(
    "preds, targets, message",
    [
        ([_pred([G1], [0.9], [1])], [], "1 predictions and 0 targets"),
        ([_pred([G1], [0.9, 0.8], [1])], [_target([G1], [1])], r"`scores` must have shape \[1\]"),
        ([{"boxes": torch.zeros(0, 5), "labels": torch.zeros(0)}], [_target([G1], [1])], "no 'scores'"),
        ([_pred([G1], [0.9], [1])], [{"boxes": torch.ones(1, 4), "labels": torch.ones(1)}], r"shape \[N, 5\]"),
        ([_pred([G1], [0.9], [0])], [_target([G1], [1])], r"prediction labels must be in 1\.\.2"),
        ([_pred([G1], [0.9], [1])], [_target([G1], [3])], r"target labels must be in 1\.\.2"),
    ],
)
def test_bad_input_is_refused(preds, targets, message):
    with pytest.raises(ValueError, match=message):
        RotatedMeanAveragePrecision(2).update(preds, targets)


# ---- the DOTA devkit, by hand ----
# "plane": image A holds P1 (square), Q (non-convex: (100,0) (110,0) (110,10) (106,4), area 40), P3 (difficult 1);
# image B holds P4 (difficult 2: a truncated patch object) and P5 (12 x 12). Positives: P1, Q, P5.
#   rank  score  image  detection                    best IoU            outcome
#   1     0.9    A      = P1                         1                   TP
#   2     0.85   A      = P3                         1 (difficult)       neither
#   3     0.8    B      = P4                         1 (difficult)       neither
#   4     0.7    A      = P1                         1 (matched)         FP
#   5     0.6    B      P5 moved 4 along x           96/192 = 0.5        FP (devkit: IoU > 0.5 strictly)
#   6     0.5    A      x 100..110, y 0..5           (37.5 - 35/6) / (90 - 31.67) = 0.5429 with Q   TP
# cum TP 1 1 1 1 1 2, FP 0 0 0 1 2 2; recall 1/3 (x5) 2/3, precision 1 1 1 1/2 1/3 1/2.
# 11-point: t = 0 .. .3 -> 1 (4), t = .4 .. .6 -> 1/2 (3), t = .7 .. 1 -> 0 (4): AP = 5.5 / 11 = 0.5.
# "ship" has no objects: AP 0, and it counts in the mean: mAP 0.25.
SQUARE = [0.0, 0.0, 10.0, 0.0, 10.0, 10.0, 0.0, 10.0]
Q = [100.0, 0.0, 110.0, 0.0, 110.0, 10.0, 106.0, 4.0]
P3 = [50.0, 50.0, 60.0, 50.0, 60.0, 60.0, 50.0, 60.0]
P4 = [0.0, 0.0, 12.0, 0.0, 12.0, 12.0, 0.0, 12.0]
P5 = [30.0, 30.0, 42.0, 30.0, 42.0, 42.0, 30.0, 42.0]
DEVKIT_GT = {
    "A": [(SQUARE, "plane", 0), (Q, "plane", 0), (P3, "plane", 1)],
    "B": [(P4, "plane", 2), (P5, "plane", 0)],
    "C": [],
}
DEVKIT_DETS = {
    "plane": [
        ("A", 0.5, [100.0, 0.0, 110.0, 0.0, 110.0, 5.0, 100.0, 5.0]), ("A", 0.9, SQUARE), ("A", 0.85, P3),
        ("B", 0.8, P4), ("A", 0.7, SQUARE), ("B", 0.6, [34.0, 30.0, 46.0, 30.0, 46.0, 42.0, 34.0, 42.0]),
    ],
    "ship": [("C", 0.3, SQUARE)],
}


def test_devkit_hand_case_with_difficult_objects_and_a_non_convex_one():
    rect = torch.tensor([DEVKIT_DETS["plane"][0][2]], dtype=torch.float64)
    assert polygon_iou(torch.tensor([Q], dtype=torch.float64), rect).item() == pytest.approx(0.38 / 0.7, abs=1e-9)
    result = dota_devkit_map(DEVKIT_DETS, DEVKIT_GT, ["plane", "ship"])
    assert result["ap_per_class"] == pytest.approx({"plane": 0.5, "ship": 0.0})
    assert result["map"] == pytest.approx(0.25)
    # just under the threshold, rank 5 becomes a TP: precision 1 1 1 1/2 2/3 3/4, recall reaches 1
    looser = dota_devkit_map(DEVKIT_DETS, DEVKIT_GT, ["plane"], iou_threshold=0.49)
    assert looser["ap_per_class"]["plane"] == pytest.approx((4 + 7 * 0.75) / 11)
    # with nothing difficult, rank 2 and 3 are TPs of their own objects: 5 positives, TP TP TP FP FP TP
    plain = {image: [(p, c, 0) for p, c, _ in objects] for image, objects in DEVKIT_GT.items()}
    # recall .2 .4 .6 .6 .6 .8, precision 1 1 1 .75 .6 2/3: t = 0 .. .5 -> 1 (6); t = .6 .. .8 -> 2/3 (3),
    # as numpy's arange gives 0.6000000000000001, above the recall 3/5; t = .9, 1 -> 0
    assert dota_devkit_map(DEVKIT_DETS, plain, ["plane"])["map"] == pytest.approx((6 + 3 * 2 / 3) / 11)


def test_devkit_refuses_unknown_images():
    with pytest.raises(ValueError, match=r"images \['Z'\]"):
        dota_devkit_map({"plane": [("Z", 0.9, SQUARE)]}, DEVKIT_GT, ["plane"])


def devkit_voc_eval(dets, recs, classname, ovthresh=0.5):
    """The devkit's voc_eval (11-point), written as it is written, with exact polygon IoU for ``polyiou``."""
    class_recs, npos = {}, 0
    for imagename, objects in recs.items():
        R = [obj for obj in objects if obj[1] == classname]
        difficult = np.array([x[2] for x in R]).astype(bool)
        npos += sum(~difficult)
        class_recs[imagename] = {"bbox": np.array([x[0] for x in R]), "difficult": difficult, "det": [False] * len(R)}
    image_ids = [d[0] for d in dets]
    confidence = np.array([d[1] for d in dets])
    BB = np.array([d[2] for d in dets]).reshape(-1, 8)
    sorted_ind = np.argsort(-confidence, kind="stable")
    BB, image_ids = BB[sorted_ind], [image_ids[x] for x in sorted_ind]
    tp, fp = np.zeros(len(image_ids)), np.zeros(len(image_ids))
    for d in range(len(image_ids)):
        R = class_recs[image_ids[d]]
        bb, ovmax, BBGT = BB[d].astype(float), -np.inf, R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0::2].min(1), bb[0::2].min())
            iymin = np.maximum(BBGT[:, 1::2].min(1), bb[1::2].min())
            ixmax = np.minimum(BBGT[:, 0::2].max(1), bb[0::2].max())
            iymax = np.minimum(BBGT[:, 1::2].max(1), bb[1::2].max())
            inters = np.maximum(ixmax - ixmin + 1.0, 0.0) * np.maximum(iymax - iymin + 1.0, 0.0)
            keep_index = np.where(inters > 0)[0]
            if len(keep_index) > 0:
                overlaps = [polygon_iou(torch.tensor(BBGT[k][None]), torch.tensor(bb[None])).item() for k in keep_index]
                ovmax, jmax = np.max(overlaps), keep_index[np.argmax(overlaps)]
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d], R["det"][jmax] = 1.0, 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec, prec = tp / float(npos), tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        ap += (0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])) / 11.0
    return ap


def test_devkit_matches_a_port_of_voc_eval_on_random_data():
    rng = np.random.default_rng(11)
    classes = ["plane", "ship", "harbor"]
    recs, dets = {}, {name: [] for name in classes}
    for image in range(8):
        n = int(rng.integers(1, 7))
        boxes = torch.tensor(np.concatenate([rng.uniform(20, 150, (n, 2)), rng.uniform(8, 40, (n, 2)),
                                             rng.uniform(-1.5, 1.5, (n, 1))], 1))  # fmt: skip
        polygons = le90_to_polygons(boxes).numpy()
        polygons[:, 6:] += rng.normal(0, 2, (n, 2))  # move one corner: irregular, sometimes non-convex quads
        names = rng.choice(classes, n)
        recs[f"img{image}"] = [(p.tolist(), str(c), int(rng.choice([0, 0, 0, 1, 2]))) for p, c in zip(polygons, names)]
        found = boxes.repeat(2, 1) + torch.tensor(rng.normal(0, 1, (2 * n, 5))) * torch.tensor([3, 3, 3, 3, 0.15])
        found[:, 2:4] = found[:, 2:4].abs() + 1
        for polygon, name in zip(le90_to_submission_polygons(found).tolist(), np.concatenate([names, names])):
            dets[str(name) if rng.random() > 0.1 else str(rng.choice(classes))].append(
                (f"img{image}", float(rng.random()), polygon))
    result = dota_devkit_map(dets, recs, classes)
    expected = {name: devkit_voc_eval(dets[name], recs, name) for name in classes}
    assert result["ap_per_class"] == pytest.approx(expected, abs=1e-12)
    assert result["map"] == pytest.approx(np.mean(list(expected.values())), abs=1e-12)
    assert 0.2 < result["map"] < 0.95


# ---- Task1 submission files ----


def mmrotate_best_begin_point(polygon):
    """mmrotate's get_best_begin_point_single, on one 8-number polygon."""
    x1, y1, x2, y2, x3, y3, x4, y4 = polygon
    xmin, ymin, xmax, ymax = min(x1, x2, x3, x4), min(y1, y2, y3, y4), max(x1, x2, x3, x4), max(y1, y2, y3, y4)
    combine = [[[x1, y1], [x2, y2], [x3, y3], [x4, y4]], [[x2, y2], [x3, y3], [x4, y4], [x1, y1]],
               [[x3, y3], [x4, y4], [x1, y1], [x2, y2]], [[x4, y4], [x1, y1], [x2, y2], [x3, y3]]]  # fmt: skip
    dst = [[xmin, ymin], [xmax, ymin], [xmax, ymax], [xmin, ymax]]
    force, flag = 100000000.0, 0
    for i in range(4):
        temp = sum(math.sqrt(math.pow(combine[i][k][0] - dst[k][0], 2) + math.pow(combine[i][k][1] - dst[k][1], 2))
                   for k in range(4))  # fmt: skip
        if temp < force:
            force, flag = temp, i
    return [v for point in combine[flag] for v in point]


def test_submission_polygons_start_nearest_the_top_left():
    # theta = -pi/2: corners (-2, 5) (-2, -5) (2, -5) (2, 5); the top-left one is the second
    turned = le90_to_submission_polygons(torch.tensor([[0.0, 0.0, 10.0, 4.0, -math.pi / 2]]))
    torch.testing.assert_close(turned, torch.tensor([[-2.0, -5.0, 2.0, -5.0, 2.0, 5.0, -2.0, 5.0]]), atol=1e-5, rtol=0)
    # the spec's box: the first corner already is the best start
    spec = le90_to_submission_polygons(torch.tensor([[50.0, 50.0, 40.0, 20.0, -math.pi / 6]]))
    torch.testing.assert_close(spec, le90_to_polygons(torch.tensor([[50.0, 50.0, 40.0, 20.0, -math.pi / 6]])))
    g = torch.Generator().manual_seed(0)
    boxes = torch.cat([torch.rand(300, 2, generator=g) * 500, torch.rand(300, 2, generator=g) * 50 + 2,
                       (torch.rand(300, 1, generator=g) - 0.5) * math.pi], dim=1)  # fmt: skip
    ours = le90_to_submission_polygons(boxes)
    theirs = [mmrotate_best_begin_point(p) for p in le90_to_polygons(boxes).tolist()]
    assert ours.tolist() == theirs
    starts = {tuple(le90_to_polygons(boxes)[k, :2].tolist()) == tuple(ours[k, :2].tolist()) for k in range(300)}
    assert starts == {True, False}  # some boxes are rotated, some are not


def test_write_task1_files_and_zip(tmp_path):
    predictions = {
        "P0001": {"boxes": torch.tensor([[50.0, 50.0, 40.0, 20.0, -math.pi / 6], [0.0, 0.0, 10.0, 4.0, -math.pi / 2]]),
                  "scores": torch.tensor([0.9, 0.25]), "labels": torch.tensor([1, 7])},
        "P0002": {"boxes": torch.tensor([[10.0, 20.0, 8.0, 8.0, 0.0]]), "scores": torch.tensor([0.125]),
                  "labels": torch.tensor([1])},
        "P0003": {"boxes": torch.zeros(0, 5), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)},
    }  # fmt: skip
    detections = task1_detections(predictions, DOTA_CLASSES)
    assert set(detections) == set(DOTA_CLASSES)
    archive = write_task1(detections, tmp_path / "submission", DOTA_CLASSES)
    out = tmp_path / "submission"
    assert archive == out / "Task1.zip"
    assert sorted(p.name for p in out.iterdir()) == sorted([f"Task1_{c}.txt" for c in DOTA_CLASSES] + ["Task1.zip"])
    plane = (out / "Task1_plane.txt").read_text()
    assert plane == ("P0001 0.8999999761581421 27.68 51.34 62.32 31.34 72.32 48.66 37.68 68.66\n"  # float32 0.9
                     "P0002 0.125 6.00 16.00 14.00 16.00 14.00 24.00 6.00 24.00\n")  # fmt: skip
    assert (out / "Task1_ship.txt").read_text() == "P0001 0.25 -2.00 -5.00 2.00 -5.00 2.00 5.00 -2.00 5.00\n"
    assert all((out / f"Task1_{c}.txt").read_bytes() == b"" for c in DOTA_CLASSES if c not in ("plane", "ship"))
    with zipfile.ZipFile(archive) as zf:
        assert zf.namelist() == [f"Task1_{c}.txt" for c in DOTA_CLASSES]
        assert all(zf.read(f"Task1_{c}.txt") == (out / f"Task1_{c}.txt").read_bytes() for c in DOTA_CLASSES)
    # written again with fewer detections: every file is replaced
    write_task1({"plane": detections["plane"][:1]}, out, DOTA_CLASSES)
    assert (out / "Task1_plane.txt").read_text().count("\n") == 1 and (out / "Task1_ship.txt").read_text() == ""
    # and the files read back score like the detections they came from
    lines = {c: [line.split() for line in (out / f"Task1_{c}.txt").read_text().splitlines()] for c in DOTA_CLASSES}
    read_back = {c: [(f[0], float(f[1]), [float(v) for v in f[2:]]) for f in fields] for c, fields in lines.items()}
    gt = {"P0001": [(detections["plane"][0][2], "plane", 0)], "P0002": [], "P0003": []}
    assert dota_devkit_map(read_back, gt, ["plane"])["map"] == pytest.approx(1.0)


def test_task1_refuses_bad_labels_and_polygons(tmp_path):
    with pytest.raises(ValueError, match=r"labels must be in 1\.\.15, got 16\.\.16"):
        task1_detections({"P1": {"boxes": torch.zeros(1, 5), "scores": torch.ones(1), "labels": torch.tensor([16])}},
                         DOTA_CLASSES)  # fmt: skip
    with pytest.raises(ValueError, match="needs 8 numbers, got 4"):
        write_task1({"plane": [("P1", 0.5, [0, 0, 1, 1])]}, tmp_path, DOTA_CLASSES)
    with pytest.raises(ValueError, match=r"classes \['boat'\]"):
        write_task1({"boat": []}, tmp_path, DOTA_CLASSES)
