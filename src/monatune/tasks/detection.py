"""Object detection and instance segmentation: a torchvision detector on a tuned backbone, COCO AP."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..engine.module import TunedModule
from ..metrics import COCOMeanAveragePrecision, VOCMeanAveragePrecision
from ..metrics.coco import COCO_STATS
from ..models.base import swap_class
from ..models.detection.builders import DETECTORS, build_detector
from ..models.detection.transform import BucketedTransform
from ..models.swin import freeze_stages

__all__ = ["ObjectDetector", "draw_detections"]

METRICS = ("coco", "voc")


def _plain(target: dict[str, Any], *, training: bool) -> dict[str, Tensor]:
    """A torchvision target without tv_tensor wrappers.

    Training targets leave out COCO crowd regions and VOC difficult objects: torchvision's
    detectors have no ignore regions, and the release (mmdetection) trains on neither.
    """
    out = {k: v.as_subclass(Tensor) if isinstance(v, Tensor) else v for k, v in target.items()}
    if training:
        n = len(out["labels"])
        keep = torch.ones(n, dtype=torch.bool, device=out["labels"].device)
        if "iscrowd" in out:
            keep &= out["iscrowd"] == 0
        if "difficult" in out:
            keep &= ~out["difficult"].bool()
        if not keep.all():
            out = {k: v[keep] if isinstance(v, Tensor) and v.ndim >= 1 and len(v) == n else v for k, v in out.items()}
    return out


class ObjectDetector(TunedModule):
    """A detector (``retinanet``, ``fcos``, ``faster_rcnn``, ``mask_rcnn``, ``cascade_mask_rcnn``) on a tuned backbone.

    The neck and heads train fully; the backbone (``model.backbone.body``) follows the method.

    Metrics, in ``results.json`` and the logs:

    - ``metric="coco"``: the twelve COCO statistics by pycocotools' ``COCOeval``
      (:class:`~monatune.metrics.COCOMeanAveragePrecision`): ``val/map`` (AP@[.5:.95], the monitor),
      ``val/map_50``, ``val/map_75``, ``val/map_small`` ... ``val/mar_large``, and for mask models
      the same as ``val/segm_map`` .... Crowd regions (and VOC difficult objects) are ignored, as
      COCO's protocol does; masks are the stages' probabilities at >= 0.5.
    - ``metric="voc"``: Pascal VOC mAP@0.5 with difficult objects ignored
      (:class:`~monatune.metrics.VOCMeanAveragePrecision`), ``val/voc_map50`` (the monitor), with
      11-point interpolation (the VOC2007 devkit, which the release's mmdetection uses for VOC2007
      test) or ``voc_ap_method="area"`` (the VOC2010+ devkit).

    Args:
        detector: Which detector.
        num_classes: Object classes without the background; taken from the data when left out.
        metric: ``coco`` or ``voc``; taken from the data (its format) when left out.
        voc_ap_method: ``11point`` or ``area``, for ``metric="voc"``.
        min_size: The shorter side the detector resizes evaluation images to (torchvision's
            ``min_size``); taken from the data's ``eval_size`` when left out, else 800.
        max_size: The longest side; from the data, else 1333.
        predict_threshold: ``predict`` keeps (writes and draws) detections scoring at least this.
        fpn_channels: Width of the FPN and the heads reading it (the release: 256).
        frozen_stages: The release's Swin ``frozen_stages`` on top of the method (:func:`monatune.models.swin.freeze_stages`):
            0 or 1 freezes the patch embedding (the release's VOC RetinaNet: 1, for every method); -1: nothing.
        detector_kwargs: Extra arguments of the torchvision detector (``score_thresh``, ...).
        **kwargs: Backbone, method and optimiser arguments of :class:`~monatune.engine.TunedModule`.
    """

    def __init__(
        self,
        backbone: str,
        *,
        detector: str = "retinanet",
        num_classes: int | None = None,
        metric: str | None = None,
        voc_ap_method: str = "11point",
        min_size: int | None = None,
        max_size: int | None = None,
        predict_threshold: float = 0.3,
        fpn_channels: int = 256,
        frozen_stages: int = -1,
        detector_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if detector not in DETECTORS:
            raise ValueError(f"unknown detector {detector!r}; choose from {DETECTORS}")
        if metric is not None and metric not in METRICS:
            raise ValueError(f"unknown detection metric {metric!r}; choose from {METRICS}")
        super().__init__(backbone, **kwargs)
        self.detector, self.num_classes, self.metric = detector, num_classes, metric
        self.voc_ap_method = voc_ap_method
        self.min_size, self.max_size = min_size, max_size
        self.predict_threshold, self.fpn_channels = predict_threshold, fpn_channels
        self.frozen_stages = frozen_stages
        self.detector_kwargs = dict(detector_kwargs or {})
        self.masks = detector in ("mask_rcnn", "cascade_mask_rcnn")
        self.classes: list[str] | None = None

    @property
    def monitor(self) -> str:
        """The validation metric that picks the best checkpoint (higher is better)."""
        return "val/voc_map50" if self.metric == "voc" else "val/map"

    def build_network(self) -> nn.Module:
        data = self._classes_from_data()
        self.metric = self.metric or getattr(data, "metric", None) or "coco"
        eval_size = getattr(data, "eval_size", None) or (800, 1333)
        self.min_size = self.min_size or eval_size[0]
        self.max_size = self.max_size or eval_size[1]
        self.val_metric, self.test_metric = self._new_metric(), self._new_metric()
        network = build_detector(
            self.detector, self.backbone_name, num_classes=self.num_classes,
            model_kwargs={**self.model_kwargs, "drop_path_rate": self.drop_path_rate},
            min_size=self.min_size, max_size=self.max_size, fpn_channels=self.fpn_channels, **self.detector_kwargs,
        )  # fmt: skip
        # monatune's data modules resize training images themselves (the release's multi-scale policy)
        network.transform._skip_resize = bool(getattr(data, "resizes_training_images", False))
        return network

    def configure_model(self) -> None:
        built = self.model is None
        super().configure_model()
        if built:
            freeze_stages(self.model.backbone.body, self.frozen_stages)

    def _new_metric(self) -> nn.Module:
        if self.metric == "voc":
            return VOCMeanAveragePrecision(self.num_classes, ap_method=self.voc_ap_method)
        return COCOMeanAveragePrecision(iou_type=("bbox", "segm") if self.masks else "bbox")

    def tuned_part(self, network: nn.Module) -> nn.Module:
        return network.backbone.body

    def compiled_part(self, network: nn.Module) -> nn.Module:
        return network.backbone  # the tuned body and the FPN; the heads' sampling and NMS change shape with the data

    def use_size_buckets(self, network: nn.Module, buckets: int | tuple[int, ...] | None) -> None:
        if not isinstance(network.transform, BucketedTransform):  # torchvision's own (FCOS, Faster/Mask R-CNN)
            swap_class(network.transform, BucketedTransform)
        network.transform.size_buckets = buckets

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return self.model([im.as_subclass(Tensor) for im in images])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        if not batch.get("images"):
            return None
        targets = [_plain(t, training=True) for t in batch["targets"]]
        losses = self.model([im.as_subclass(Tensor) for im in batch["images"]], targets)
        loss = sum(losses.values())
        n = len(batch["images"])
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def _evaluate(self, batch: dict[str, Any], metric: nn.Module) -> None:
        if not batch.get("images"):
            return
        preds = self(batch["images"])
        targets = [_plain(t, training=False) for t in batch["targets"]]
        if self.metric == "voc":
            metric.update([{k: p[k] for k in ("boxes", "scores", "labels")} for p in preds], targets)
            return
        for p, t in zip(preds, targets):
            ignored = t.get("iscrowd", torch.zeros_like(t["labels"])).bool()
            if "difficult" in t:  # VOC data scored the COCO way: difficult objects are ignore regions
                ignored = ignored | t["difficult"].bool()
            t["iscrowd"] = ignored.long()
            if self.masks:
                p["masks"] = p["masks"][:, 0] >= 0.5  # N, H, W; mmdet's mask_thr_binary
                t["masks"] = t["masks"].bool()
            else:
                p.pop("masks", None)
                t.pop("masks", None)
        metric.update(preds, targets)

    def _log_metric(self, metric: nn.Module, stage: str) -> None:
        if self.metric == "voc" and metric.update_count == 0:
            metric.update([], [])  # a process that saw no image still needs typed states to gather
        values = metric.compute()  # gathers every process's detections
        metric.reset()
        if self.metric == "voc":
            self.log(f"{stage}/voc_map50", values["map"].float(), prog_bar=True, sync_dist=False)
            return
        for key in COCO_STATS:
            for iou in ("bbox", "segm") if self.masks else ("bbox",):
                name = f"{iou}_{key}" if self.masks else key
                if name in values:
                    label = key if iou == "bbox" else f"segm_{key}"
                    self.log(f"{stage}/{label}", values[name].float(), prog_bar=label == "map", sync_dist=False)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metric)

    def on_validation_epoch_end(self) -> None:
        self._log_metric(self.val_metric, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metric)

    def on_test_epoch_end(self) -> None:
        self._log_metric(self.test_metric, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per image: ``path`` and the detections scoring at least ``predict_threshold``: ``boxes``
        (``x1, y1, x2, y2`` in the image's pixels), ``labels``, ``names``, ``scores`` and, for mask
        models, ``masks`` as COCO RLEs."""
        if not batch.get("images"):
            return []
        rows = []
        for path, p in zip(batch["paths"], self(batch["images"])):
            keep = p["scores"] >= self.predict_threshold
            labels = p["labels"][keep].tolist()
            row = {
                "path": path,
                "boxes": [[round(float(v), 2) for v in box] for box in p["boxes"][keep].float().cpu()],
                "labels": labels,
                "names": [self._name(label) for label in labels],
                "scores": [round(float(v), 4) for v in p["scores"][keep].float().cpu()],
            }  # fmt: skip
            if "masks" in p:
                row["masks"] = _encode_masks(p["masks"][keep][:, 0] > 0.5)
            rows.append(row)
        return rows

    def _name(self, label: int) -> str:
        return self.classes[label - 1] if self.classes and 0 < label <= len(self.classes) else str(label)

    def draw_prediction(self, row: dict[str, Any]) -> Any:
        """The image of a ``predict`` row with its boxes, names, scores and masks drawn (a PIL image)."""
        return draw_detections(row)


def _encode_masks(masks: Tensor) -> list[dict[str, Any]]:
    """COCO RLEs (``size``, ``counts`` as a string) of boolean masks ``[N, H, W]``."""
    from pycocotools import mask as mask_utils

    if not len(masks):
        return []
    array = np.asfortranarray(masks.cpu().numpy().transpose(1, 2, 0).astype(np.uint8))
    rles = mask_utils.encode(array)
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def draw_detections(row: dict[str, Any]) -> Any:
    """Draw a ``predict`` row's masks, boxes and ``name score`` labels on its image; a PIL image.

    Colours follow the label, so one class keeps one colour across images.
    """
    from pycocotools import mask as mask_utils
    from torchvision.transforms.v2 import functional as F
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from ..data.images import read_rgb

    image = F.pil_to_tensor(read_rgb(row["path"]))  # 16-bit and float images scaled as the model saw them
    colours = [_colour(label) for label in row["labels"]]
    if row.get("masks"):
        masks = torch.from_numpy(mask_utils.decode([{**m, "counts": m["counts"].encode("ascii")} for m in row["masks"]]))
        image = draw_segmentation_masks(image, masks.permute(2, 0, 1).bool(), alpha=0.45, colors=colours)
    if row["boxes"]:
        text = [f"{n} {s:.2f}" for n, s in zip(row["names"], row["scores"])]
        thick = max(1, round(max(image.shape[-2:]) / 300))
        image = draw_bounding_boxes(image, torch.tensor(row["boxes"]), text, colors=colours, width=thick)
    return F.to_pil_image(image)


def _colour(label: int) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((label * 0.61803398875) % 1.0, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)
