"""VOC detection mAP against hand-computed values and a port of the VOC devkit; COCO AP of torchmetrics by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision
from torchmetrics.utilities import dim_zero_cat

from monatune.metrics import VOCMeanAveragePrecision


def _pred(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.long)}  # fmt: skip


def _target(boxes, labels, difficult=None):
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.tensor(labels, dtype=torch.long)}  # fmt: skip
    if difficult is not None:
        target["difficult"] = torch.tensor(difficult, dtype=torch.bool)
    return target


def _voc(preds, targets, num_classes=1, **kwargs):
    metric = VOCMeanAveragePrecision(num_classes, **kwargs)
    metric.update(preds, targets)
    return metric.compute()


# One class, two images, three ground-truth boxes (A: g1, g2; B: g3), five detections, given out of score order.
#   rank  score  image  box                       IoU           outcome
#   1     0.9    A      = g1                      1.0           TP (g1 matched)
#   2     0.8    B      disjoint                  0             FP
#   3     0.7    A      = g1                      1.0           FP (g1 already matched)
#   4     0.6    B      = g3                      1.0           TP
#   5     0.5    A      g2's top half             50/100 = 0.5  TP (IoU >= 0.5, mmdetection's rule)
# cum TP 1 1 1 2 3, cum FP 0 1 2 2 2 -> recall 1/3 1/3 1/3 2/3 1, precision 1 1/2 1/3 1/2 3/5.
# 11-point: t = 0, .1, .2, .3 -> max precision at recall >= t is 1; t = .4 ... 1 (7 thresholds) -> 3/5:
#   AP = (4 * 1 + 7 * 0.6) / 11 = 8.2 / 11.
# area: envelope (running max from the right) 1, .6, .6, .6, .6 -> AP = 1/3 * 1 + 1/3 * .6 + 1/3 * .6 = 1/3 + 0.4.
G1, G2, G3 = [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]
HAND_PREDS = [
    _pred([[20, 20, 30, 25], G1, G1], [0.5, 0.7, 0.9], [1, 1, 1]),  # image A
    _pred([G3, [50, 50, 60, 60]], [0.6, 0.8], [1, 1]),  # image B
]
HAND_TARGETS = [_target([G1, G2], [1, 1]), _target([G3], [1])]
HAND_11POINT = 8.2 / 11
HAND_AREA = 1 / 3 + 0.4


@pytest.mark.parametrize("ap_method, expected", [("11point", HAND_11POINT), ("area", HAND_AREA)])
def test_hand_computed_ap(ap_method, expected):
    result = _voc(HAND_PREDS, HAND_TARGETS, ap_method=ap_method)
    assert result["map"].item() == pytest.approx(expected, abs=1e-6)
    assert result["map_per_class"].shape == ()  # torchmetrics squeezes one-element results
    assert result["map_per_class"].item() == pytest.approx(expected, abs=1e-6)


def test_iou_exactly_at_the_threshold_matches_and_just_above_it_does_not():
    # rank 5 (IoU exactly 0.5) stops matching: TP FP FP TP FP -> recall stops at 2/3, AP (4 + 3 * 0.5) / 11
    assert _voc(HAND_PREDS, HAND_TARGETS, iou_threshold=0.51)["map"].item() == pytest.approx(5.5 / 11, abs=1e-6)


def test_11point_thresholds_are_numpys_arange_as_in_the_devkit():
    # 10 boxes; TP TP TP FP TP -> cum TP 1 2 3 3 4, recall .1 .2 .3 .3 .4, precision 1 1 1 .75 .8.
    # np.arange(0, 1.1, 0.1)[3] is 0.30000000000000004 > 0.3, so at that threshold only the last point counts:
    # (3 * 1 + 0.8 (t = .3) + 0.8 (t = .4)) / 11; with an exact 0.3 it would be (4 * 1 + 0.8) / 11.
    boxes = [[20 * k, 0, 20 * k + 10, 10] for k in range(10)]
    preds = [_pred([boxes[0], boxes[1], boxes[2], [0, 50, 10, 60], boxes[3]], [0.9, 0.8, 0.7, 0.6, 0.5], [1] * 5)]
    recall, precision = np.array([0.1, 0.2, 0.3, 0.3, 0.4]), np.array([1, 1, 1, 0.75, 0.8])
    expected = devkit_voc_ap(recall, precision, use_07_metric=True)
    assert expected == pytest.approx(4.6 / 11)
    assert _voc(preds, [_target(boxes, [1] * 10)])["map"].item() == pytest.approx(4.6 / 11, abs=1e-6)


def test_detections_with_equal_scores_keep_the_order_they_were_given_in():
    # FP then TP at the same score: precision 0, 1/2 -> 11-point AP 0.5; TP then FP: precision 1, 1/2 -> 1
    miss, hit = [50, 50, 60, 60], G1
    fp_first = _voc([_pred([miss, hit], [0.9, 0.9], [1, 1])], [_target([G1], [1])])
    tp_first = _voc([_pred([hit, miss], [0.9, 0.9], [1, 1])], [_target([G1], [1])])
    assert (fp_first["map"].item(), tp_first["map"].item()) == (0.5, 1.0)


def test_a_detection_on_a_difficult_box_is_ignored_and_difficult_boxes_are_not_positives():
    preds = [HAND_PREDS[0], _pred([G3, [50, 50, 60, 60], [70, 70, 80, 80]], [0.6, 0.8, 0.85], [1, 1, 1])]
    targets = [
        _target([G1, G2, [90, 0, 99, 9]], [1, 1, 1], [False, False, True]),  # a difficult box nothing finds
        _target([G3, [70, 70, 80, 80]], [1, 1], [False, True]),  # a difficult box found at 0.85
    ]
    assert _voc(preds, targets)["map"].item() == pytest.approx(HAND_11POINT, abs=1e-6)
    for target in targets:
        del target["difficult"]  # all ordinary: 5 positives, the 0.85 detection a TP -> another AP
    assert _voc(preds, targets)["map"].item() != pytest.approx(HAND_11POINT, abs=1e-3)


def test_a_detection_whose_best_box_is_difficult_is_ignored_even_if_it_overlaps_another():
    # IoU 1 with the difficult box, 0.5 with the ordinary one: ignored (the devkit looks at the best box only)
    preds = [_pred([[0, 0, 10, 10]], [0.9], [1])]
    targets = [_target([[0, 0, 10, 10], [0, 0, 10, 20]], [1, 1], [True, False])]
    assert _voc(preds, targets)["map"].item() == 0.0


def test_a_duplicate_detection_of_a_matched_box_is_a_false_positive():
    # TP FP TP -> recall .5 .5 1, precision 1 .5 2/3; 11-point: t = 0 ... .5 -> 1, t = .6 ... 1 -> 2/3
    preds = [_pred([G1, G1, G2], [0.9, 0.8, 0.7], [1, 1, 1])]
    targets = [_target([G1, G2], [1, 1])]
    assert _voc(preds, targets)["map"].item() == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-6)


def test_classes_without_positives_are_nan_and_left_out_of_the_mean():
    preds = [_pred([G1, G2, [40, 40, 50, 50]], [0.9, 0.8, 0.7], [1, 3, 4])]
    targets = [_target([G1, [60, 60, 70, 70], [40, 40, 50, 50]], [1, 2, 4], [False, False, True])]
    per_class = _voc(preds, targets, num_classes=4)["map_per_class"]
    assert per_class[:2].tolist() == [1.0, 0.0]  # class 1 found; class 2 has a box and no detection
    assert per_class[2:].isnan().all()  # class 3: detections only; class 4: a difficult box only
    assert _voc(preds, targets, num_classes=4)["map"].item() == 0.5


def test_no_positives_at_all_gives_zero():
    result = _voc([_pred([G1], [0.9], [1])], [_target([], [])], num_classes=2)
    assert result["map"].item() == 0.0 and result["map_per_class"].isnan().all()


# ---- cross-check against a port of the devkit's voc_eval.py (py-faster-rcnn), written the way it is written ----


def devkit_voc_ap(rec, prec, use_07_metric=False):
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            if np.sum(rec >= t) == 0:
                p = 0
            else:
                p = np.max(prec[rec >= t])
            ap = ap + p / 11.0
    else:
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return ap


def devkit_voc_eval(dets, gts, classname, ovthresh=0.5, use_07_metric=False):
    """``dets``: (image, class, score, x1, y1, x2, y2); ``gts``: image -> list of (class, difficult, box).

    Boxes are 1-based inclusive pixel indices, as in the XML files; returns (ap, npos).
    """
    class_recs = {}
    npos = 0
    for imagename, objects in gts.items():
        R = [obj for obj in objects if obj[0] == classname]
        bbox = np.array([x[2] for x in R]).reshape(-1, 4)
        difficult = np.array([x[1] for x in R]).astype(bool)
        det = [False] * len(R)
        npos = npos + sum(~difficult)
        class_recs[imagename] = {"bbox": bbox, "difficult": difficult, "det": det}

    lines = [d for d in dets if d[1] == classname]
    image_ids = [x[0] for x in lines]
    confidence = np.array([float(x[2]) for x in lines])
    BB = np.array([[float(z) for z in x[3:]] for x in lines]).reshape(-1, 4)

    sorted_ind = np.argsort(-confidence)
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]

    nd = len(image_ids)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)  # fmt: skip
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)

        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0

    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos) if npos else tp * np.nan
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return devkit_voc_ap(rec, prec, use_07_metric), npos


def _random_voc_case(seed, num_images=12, num_classes=4):
    """Devkit-style data (1-based inclusive integer pixel boxes) and the same data as monatune stores it."""
    rng = np.random.default_rng(seed)
    gts, dets, preds, targets = {}, [], [], []
    for image in range(num_images):
        n = int(rng.integers(0, 6))
        xy = rng.integers(1, 150, size=(n, 2))
        wh = rng.integers(5, 60, size=(n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(float)
        classes = rng.integers(1, num_classes, size=n)  # the last class never has a box
        difficult = rng.random(n) < 0.2
        gts[image] = [(int(c), bool(d), b) for c, d, b in zip(classes, difficult, boxes)]
        # detections: jittered copies of the boxes (some of another class, some duplicated), plus clutter
        again = rng.random(n) < 0.3
        copies, labels = np.concatenate([boxes, boxes[again]]).reshape(-1, 4), np.concatenate([classes, classes[again]])
        found = copies + rng.normal(0, 4, size=copies.shape)
        labels = np.where(rng.random(len(labels)) < 0.15, rng.integers(1, num_classes + 1, len(labels)), labels)
        m = int(rng.integers(0, 4))
        clutter = np.concatenate([rng.uniform(1, 150, (m, 2)), rng.uniform(1, 150, (m, 2)) + 10], axis=1)
        det_boxes = np.concatenate([found, clutter])
        det_boxes[:, 2:] = np.maximum(det_boxes[:, 2:], det_boxes[:, :2] + 1)
        det_labels = np.concatenate([labels, rng.integers(1, num_classes + 1, m)])
        scores = rng.random(len(det_boxes))
        dets += [(image, int(c), s, *b) for c, s, b in zip(det_labels, scores, det_boxes)]
        to_edges = np.array([1.0, 1.0, 0.0, 0.0])  # monatune's reader: xmin - 1, ymin - 1, xmax, ymax
        preds.append(_pred((det_boxes - to_edges).tolist(), scores.astype(np.float32).tolist(), det_labels.tolist()))
        targets.append(_target((boxes - to_edges).tolist(), classes.tolist(), difficult.tolist()))
    return gts, dets, preds, targets


@pytest.mark.parametrize("ap_method", ["11point", "area"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_the_devkit_on_random_data(seed, ap_method):
    num_classes = 4
    gts, dets, preds, targets = _random_voc_case(seed, num_classes=num_classes)
    # the devkit reads scores from text files; use the float32 scores the metric sees, so ties are the same
    dets = [(i, c, float(np.float32(s)), *b) for i, c, s, *b in dets]
    expected = [devkit_voc_eval(dets, gts, c, use_07_metric=ap_method == "11point") for c in range(1, 5)]
    expected_per_class = [ap if npos else float("nan") for ap, npos in expected]
    result = _voc(preds, targets, num_classes=num_classes, ap_method=ap_method)
    assert result["map_per_class"].tolist() == pytest.approx(expected_per_class, abs=1e-6, nan_ok=True)
    assert result["map"].item() == pytest.approx(np.nanmean(expected_per_class), abs=1e-6)
    assert 0.05 < result["map"].item() < 0.95  # the case is neither trivial nor hopeless
    assert np.isnan(expected_per_class[-1])  # and has a class without boxes


# ---- state handling: several updates, merged metrics, and synced (concatenated) states ----


def test_updates_in_parts_merged_metrics_and_synced_states_give_the_same_result():
    _, _, preds, targets = _random_voc_case(7)
    whole = _voc(preds, targets, num_classes=4)

    in_parts = VOCMeanAveragePrecision(4)
    for k in range(0, len(preds), 5):
        in_parts.update(preds[k:k + 5], targets[k:k + 5])
    in_parts.update([], [])  # an empty update changes nothing
    first, second = VOCMeanAveragePrecision(4), VOCMeanAveragePrecision(4)
    first.update(preds[:7], targets[:7])
    second.update(preds[7:], targets[7:])
    first.merge_state(second)  # second's images come first: the order must not matter

    synced = VOCMeanAveragePrecision(4)
    synced.update(preds[:3], targets[:3])
    synced.update(preds[3:], targets[3:])
    for name in synced._defaults:
        setattr(synced, name, dim_zero_cat(getattr(synced, name)))  # after a sync each state is one tensor
    assert all(isinstance(getattr(synced, name), torch.Tensor) for name in synced._defaults)

    for metric in (in_parts, first, synced):
        result = metric.compute()
        torch.testing.assert_close(result["map_per_class"], whole["map_per_class"], equal_nan=True)
        torch.testing.assert_close(result["map"], whole["map"])


def test_reset_forgets_and_compute_before_update_is_zero():
    metric = VOCMeanAveragePrecision(2)
    metric.update(HAND_PREDS, HAND_TARGETS)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        result = metric.compute()
    assert result["map"].item() == 0.0 and result["map_per_class"].isnan().all()


# ---- bad input ----


@pytest.mark.parametrize(
    "preds, targets, message",
    [
        ([_pred([G1], [0.9], [1])], [], "1 predictions and 0 targets"),
        ([_pred([G1], [0.9, 0.8], [1])], [_target([G1], [1])], r"`scores` and `labels` must have shape \[1\]"),
        ([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}], [_target([G1], [1])], "no 'scores'"),
        ([_pred([G1], [0.9], [1])], [{"boxes": torch.ones(1, 5), "labels": torch.ones(1)}], r"shape \[N, 4\]"),
        ([_pred([G1], [0.9], [1])], [_target([G1], [1], [True, False])], "`difficult` must have shape"),
        ([_pred([G1], [0.9], [0])], [_target([G1], [1])], r"prediction labels must be in 1\.\.2"),
        ([_pred([G1], [0.9], [1])], [_target([G1], [3])], r"target labels must be in 1\.\.2"),
    ],
)
def test_bad_input_is_refused(preds, targets, message):
    with pytest.raises(ValueError, match=message):
        VOCMeanAveragePrecision(2).update(preds, targets)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ap_method": "101point"}, r"one of \('11point', 'area'\), got '101point'"),
        ({"iou_threshold": 0.0}, r"in \(0, 1\], got 0.0"),
        ({"num_classes": 0}, "positive int, got 0"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VOCMeanAveragePrecision(**{"num_classes": 2, **kwargs})


# ---- torchmetrics' COCO AP, by hand ----


def test_torchmetrics_coco_ap_by_hand():
    # One image, one class, two boxes; detections exact (IoU 1) or disjoint (IoU 0), so every IoU threshold
    # 0.5 ... 0.95 gives the same AP. Ranks: TP (0.9), FP (0.8), TP (0.7) -> recall .5 .5 1, precision
    # 1 .5 2/3; envelope 1, 2/3, 2/3. COCO reads it at recall 0, .01, ..., 1: r <= .5 (51 points) -> 1,
    # r > .5 (50 points) -> 2/3. AP = (51 + 50 * 2/3) / 101 = 0.834983...
    metric = MeanAveragePrecision(iou_type="bbox", backend="faster_coco_eval")
    metric.update([_pred([G1, [50, 50, 60, 60], G2], [0.9, 0.8, 0.7], [1, 1, 1])], [_target([G1, G2], [1, 1])])
    result = metric.compute()
    expected = (51 + 50 * 2 / 3) / 101
    for key in ("map", "map_50", "map_75"):
        assert result[key].item() == pytest.approx(expected, abs=1e-4), key
    # VOC's 11-point AP of the same ranks: t = 0 ... .5 -> 1, t = .6 ... 1 -> 2/3
    voc = _voc([_pred([G1, [50, 50, 60, 60], G2], [0.9, 0.8, 0.7], [1, 1, 1])], [_target([G1, G2], [1, 1])])
    assert voc["map"].item() == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-6)
