"""COCOMeanAveragePrecision equals pycocotools' COCOeval; multi-label mAP from float64 probabilities."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics.classification import MultilabelAveragePrecision
from torchmetrics.detection import MeanAveragePrecision

from monatune.metrics import COCOMeanAveragePrecision
from monatune.metrics.coco import COCO_STATS
from monatune.tasks.classification import multilabel_probabilities

H, W = 200, 260


def box_mask(box) -> torch.Tensor:
    m = torch.zeros(H, W, dtype=torch.bool)
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    m[y1:y2, x1:x2] = True
    return m


def generated(seed: int = 0, images: int = 6):
    """Images with small / medium / large objects, a crowd region each, sub-pixel boxes, and noisy detections."""
    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for i in range(images):
        sides = [6.0, 20.0, 45.0, 110.0, 0.5]  # small, small, medium, large, sub-pixel
        boxes, labels = [], []
        for k, s in enumerate(sides):
            x, y = float(torch.randint(0, W - 111, (), generator=g)), float(torch.randint(0, H - 111, (), generator=g))
            boxes.append([x, y, x + s, y + s])
            labels.append(1 + k % 3)
        crowd_box = [0.0, 0.0, 40.0, 30.0]
        boxes.append(crowd_box)
        labels.append(1)
        boxes_t = torch.tensor(boxes)
        masks = torch.stack([box_mask(b) for b in boxes])
        area = masks.flatten(1).sum(1).float()
        area[4] = 0.25  # the sub-pixel box: its annotation area
        targets.append({"boxes": boxes_t, "labels": torch.tensor(labels), "iscrowd": torch.tensor([0] * 5 + [1]),
                        "area": area, "masks": masks, "image_id": 100 + i})  # fmt: skip
        jitter = torch.randn(len(boxes), 4, generator=g) * torch.tensor([1.0, 1, 1, 1]) * (boxes_t[:, 2:3] - boxes_t[:, 0:1]) * 0.15
        det = (boxes_t + jitter).clamp(min=0)
        det[:, 2:] = torch.maximum(det[:, 2:], det[:, :2] + 1)
        extra = torch.tensor([[50.0, 50, 90, 100], [10.0, 60, 30, 70]])  # false positives
        det = torch.cat([det, extra])
        scores = torch.rand(len(det), generator=g)
        preds.append({"boxes": det, "scores": scores, "labels": torch.tensor(labels + [2, 3]),
                      "masks": torch.stack([box_mask(b) for b in det])})  # fmt: skip
    return preds, targets


def cocoeval_directly(preds, targets, iou_type: str) -> list[float]:
    """The reference: COCO json dicts written out by hand, pycocotools' COCOeval on them."""
    images, anns, dets = [], [], []
    for p, t in zip(preds, targets):
        images.append({"id": t["image_id"], "height": H, "width": W})
        for k, (b, lab) in enumerate(zip(t["boxes"].tolist(), t["labels"].tolist())):
            rle = mask_utils.encode(np.asfortranarray(t["masks"][k].numpy().astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": t["image_id"], "category_id": lab, "iscrowd": int(t["iscrowd"][k]),
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": float(t["area"][k]), "segmentation": rle})
        for k, (b, s, lab) in enumerate(zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist())):
            det = {"image_id": t["image_id"], "category_id": lab, "score": s, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
            if iou_type == "segm":
                det["segmentation"] = mask_utils.encode(np.asfortranarray(p["masks"][k].numpy().astype(np.uint8)))
            dets.append(det)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in (1, 2, 3)]}
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(dets), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return list(evaluator.stats)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_every_statistic_equals_cocoeval(iou_type):
    preds, targets = generated()
    metric = COCOMeanAveragePrecision(iou_type=iou_type)
    metric.update(preds[:2], targets[:2])  # several updates, as batches
    metric.update(preds[2:], targets[2:])
    values = metric.compute()
    expected = cocoeval_directly(preds, targets, iou_type)
    assert expected[0] > 0 and expected[3] > 0 and expected[5] > 0  # small, medium and large objects all scored
    for name, want in zip(COCO_STATS, expected):
        assert values[name].item() == pytest.approx(want, abs=1e-6), name


def test_both_iou_types_are_prefixed_and_reset_clears():
    preds, targets = generated(images=2)
    metric = COCOMeanAveragePrecision(iou_type=("bbox", "segm"))
    metric.update(preds, targets)
    values = metric.compute()
    assert {f"bbox_{n}" for n in COCO_STATS} | {f"segm_{n}" for n in COCO_STATS} == set(values)
    metric.reset()
    metric.update([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                    "masks": torch.zeros(0, H, W, dtype=torch.bool)}], targets[:1])  # fmt: skip
    assert metric.compute()["bbox_map"].item() == 0.0  # no detection: AP 0 where there is ground truth
    with pytest.raises(ValueError, match="iou_type"):
        COCOMeanAveragePrecision(iou_type="keypoints")


def test_recall_on_k_over_100_is_exact_where_float32_thresholds_are_not():
    """100 objects; detections: 7 hits, a miss, a hit. Recall is exactly 0.07 after the seventh.

    COCOeval's float64 threshold 0.07 takes the precision there (1.0); torchmetrics' float32 threshold
    (0.0700000003) takes the next recall's (8/9).
    """
    gts = torch.tensor([[20.0 * i, 15.0 * j, 20.0 * i + 10, 15.0 * j + 10] for j in range(10) for i in range(10)])
    target = {"boxes": gts, "labels": torch.ones(100, dtype=torch.int64), "image_id": 1}
    det = torch.cat([gts[:7], torch.tensor([[220.0, 170, 230, 180]]), gts[7:8]])
    pred = {"boxes": det, "scores": torch.linspace(0.99, 0.4, 9), "labels": torch.ones(9, dtype=torch.int64)}
    ours = COCOMeanAveragePrecision()
    ours.update([pred], [target])
    reference = cocoeval_directly([dict(pred, masks=torch.zeros(9, H, W, dtype=torch.bool))],
                                  [dict(target, iscrowd=torch.zeros(100), area=torch.full((100,), 100.0),
                                        masks=torch.zeros(100, H, W, dtype=torch.bool))], "bbox")  # fmt: skip
    assert ours.compute()["map"].item() == pytest.approx(reference[0], abs=1e-12)
    before = MeanAveragePrecision(backend="faster_coco_eval")
    before.update([pred], [{"boxes": gts, "labels": target["labels"]}])
    assert abs(before.compute()["map"].item() - reference[0]) > 5e-4  # the metric monatune used before


def test_multilabel_map_uses_float64_probabilities():
    # label 1 over three images: logits 30 (positive), 20 (negative), -2 (positive); label 2 ranks perfectly (AP 1)
    logits = torch.tensor([[30.0, 5.0], [20.0, -5.0], [-2.0, 4.0]])
    target = torch.tensor([[1, 1], [0, 0], [1, 1]])
    metric = MultilabelAveragePrecision(num_labels=2, average="macro")
    metric.update(multilabel_probabilities(logits), target)
    # label 1 ranked 30 > 20 > -2: precision 1 at recall 0.5, 2/3 at recall 1 -> AP = 0.5 * 1 + 0.5 * 2/3
    assert metric.compute().item() == pytest.approx((0.5 + 1 / 3 + 1.0) / 2)
    float32 = MultilabelAveragePrecision(num_labels=2, average="macro")
    float32.update(logits.sigmoid(), target)  # 30 and 20 both round to 1.0: a tie
    assert float32.compute().item() == pytest.approx((0.5 * 0.5 + 0.5 * 2 / 3 + 1.0) / 2)


def test_multilabel_batches_in_0_1_are_still_logits():
    """A batch whose logits all lie in [0, 1] is still logits (torchmetrics guesses from the values)."""
    batches = [(torch.tensor([[0.2, 0.3], [0.9, 0.1]]), torch.tensor([[1, 1], [0, 0]])),
               (torch.tensor([[3.0, 2.0], [-3.0, -2.0]]), torch.tensor([[1, 1], [0, 0]]))]  # fmt: skip
    ours = MultilabelAveragePrecision(num_labels=2)
    for logits, target in batches:
        ours.update(multilabel_probabilities(logits), target)
    # label 1 sigmoids: 0.550 (pos), 0.711 (neg), 0.953 (pos), 0.047 (neg): pos, neg, pos, neg -> AP (1 + 2/3) / 2;
    # label 2: 0.574 (pos), 0.525 (neg), 0.881 (pos), 0.119 (neg): perfect -> 1
    assert ours.compute().item() == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
