"""COCO detection and instance-segmentation AP by pycocotools' ``COCOeval``, on detections gathered as a metric.

torchmetrics' ``MeanAveragePrecision`` (faster-coco-eval backend) was the metric before; it hands
COCOeval float32 IoU and recall thresholds (0.1 becomes 0.10000000149), which moves AP whenever a
recall falls on k/100 (up to 7e-3 on small sets). This metric keeps torchmetrics' update / compute /
reset contract and process gathering, and runs pycocotools' own ``COCOeval`` (float64 thresholds),
so every statistic is COCOeval's, the one mmdetection reports.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torchmetrics import Metric

__all__ = ["COCOMeanAveragePrecision", "COCO_STATS"]

# COCOeval.summarize()'s twelve statistics, named as torchmetrics names them
COCO_STATS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
              "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")  # fmt: skip
IOU_TYPES = ("bbox", "segm")


def _rle(mask: Tensor) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.detach().cpu().numpy().astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")  # JSON-able, as COCO result files hold it
    return rle


class COCOMeanAveragePrecision(Metric):
    """COCO AP@[.5:.95] and the other eleven COCOeval statistics, for boxes and/or masks.

    ``update(preds, targets)`` takes torchvision-style dicts per image. Predictions: ``boxes``
    (x1, y1, x2, y2), ``scores``, ``labels`` and, for ``segm``, ``masks`` (N, H, W) bool. Targets:
    ``boxes``, ``labels``, optionally ``iscrowd`` (crowd regions: ignored as COCOeval ignores
    them), ``area`` (COCO's annotation area, which COCOeval uses for the small / medium / large
    ranges; default: the box area, or the mask area for ``segm``), ``masks`` for ``segm``, and
    ``image_id`` (default: a running count). Every ground-truth box is kept, however small.

    ``compute()`` returns the statistics as float64 scalars, named as torchmetrics' (``map``,
    ``map_50``, ..., ``mar_large``), prefixed ``bbox_`` / ``segm_`` when both types are asked for.

    Args:
        iou_type: ``"bbox"``, ``"segm"`` or both.
    """

    full_state_update = False

    def __init__(self, iou_type: str | Sequence[str] = "bbox", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        types = (iou_type,) if isinstance(iou_type, str) else tuple(iou_type)
        if not types or any(t not in IOU_TYPES for t in types):
            raise ValueError(f"`iou_type` must be 'bbox', 'segm' or both, got {iou_type!r}")
        self.iou_types = types
        self.add_state("images_seen", torch.tensor(0), dist_reduce_fx="sum")
        self._images: list[dict[str, Any]] = []
        self._gts: list[dict[str, Any]] = []
        self._dts: list[dict[str, Any]] = []

    def update(self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets; give one of each per image")
        segm = "segm" in self.iou_types
        for pred, target in zip(preds, targets):
            image_id = int(target["image_id"]) if "image_id" in target else len(self._images) + 10**9 * self._rank()
            record = {"id": image_id}
            if segm:  # pycocotools reads the image size to decode the masks
                record["height"], record["width"] = (int(v) for v in target["masks"].shape[-2:])
            self._images.append(record)
            boxes = target["boxes"].detach().double().cpu()
            n = len(boxes)
            crowd = target.get("iscrowd", torch.zeros(n, dtype=torch.int64)).cpu()
            area = target.get("area")
            for k in range(n):
                x1, y1, x2, y2 = boxes[k].tolist()
                ann = {"image_id": image_id, "category_id": int(target["labels"][k]), "iscrowd": int(crowd[k]),
                       "bbox": [x1, y1, x2 - x1, y2 - y1]}  # fmt: skip
                if segm:
                    ann["segmentation"] = _rle(target["masks"][k])
                if area is not None:
                    ann["area"] = float(area[k])
                elif segm:
                    ann["area"] = float(mask_utils.area(ann["segmentation"]))
                else:
                    ann["area"] = (x2 - x1) * (y2 - y1)
                self._gts.append(ann)
            pboxes = pred["boxes"].detach().double().cpu()
            for k in range(len(pboxes)):
                x1, y1, x2, y2 = pboxes[k].tolist()
                det = {"image_id": image_id, "category_id": int(pred["labels"][k]), "score": float(pred["scores"][k]),
                       "bbox": [x1, y1, x2 - x1, y2 - y1]}  # fmt: skip
                if segm:
                    det["segmentation"] = _rle(pred["masks"][k])
                self._dts.append(det)
        self.images_seen += len(preds)

    @staticmethod
    def _rank() -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def _gathered(self) -> tuple[list[dict], list[dict], list[dict]]:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self._images, self._gts, self._dts
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self._images, self._gts, self._dts))
        return tuple([x for part in parts for x in part[i]] for i in range(3))  # type: ignore[return-value]

    def compute(self) -> dict[str, Tensor]:
        images, gts, dts = self._gathered()
        categories = sorted({a["category_id"] for a in gts} | {d["category_id"] for d in dts})
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": [dict(a, id=i) for i, a in enumerate(gts, 1)],
            "categories": [{"id": c} for c in categories],
        }
        out: dict[str, Tensor] = {}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
            gt.createIndex()
            for iou_type in self.iou_types:
                stats = self._evaluate(gt, dts, iou_type)
                prefix = f"{iou_type}_" if len(self.iou_types) > 1 else ""
                out |= {prefix + name: torch.tensor(v, dtype=torch.float64) for name, v in zip(COCO_STATS, stats)}
        return out

    @staticmethod
    def _evaluate(gt: COCO, dts: list[dict], iou_type: str) -> list[float]:
        if not gt.dataset["images"]:
            return [-1.0] * len(COCO_STATS)  # COCOeval's "no data" value
        if dts:
            results = gt.loadRes([dict(d) for d in dts])  # loadRes adds ids and areas to its own copies
        else:  # loadRes refuses an empty list; no detection scores 0 where there is ground truth
            results = COCO()
            results.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
            results.createIndex()
        evaluator = COCOeval(gt, results, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        return [float(s) for s in evaluator.stats]

    def reset(self) -> None:
        super().reset()
        self._images, self._gts, self._dts = [], [], []
