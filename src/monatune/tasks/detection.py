"""Object detection and instance segmentation: a torchvision detector on a tuned backbone, COCO AP."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision

from ..engine.module import TunedModule
from ..models.detection.builders import DETECTORS, build_detector

__all__ = ["ObjectDetector"]


def _plain(target: dict[str, Any], *, training: bool) -> dict[str, Tensor]:
    """A torchvision target without tv_tensor wrappers; crowd regions left out of training targets."""
    out = {k: v.as_subclass(Tensor) if isinstance(v, Tensor) else v for k, v in target.items()}
    if training and "iscrowd" in out:
        keep = out["iscrowd"] == 0
        out = {k: v[keep] if isinstance(v, Tensor) and v.ndim >= 1 and len(v) == len(keep) else v for k, v in out.items()}
    return out


class ObjectDetector(TunedModule):
    """A detector (``retinanet``, ``fcos``, ``faster_rcnn``, ``mask_rcnn``, ``cascade_mask_rcnn``) on a tuned backbone.

    The neck and heads train fully; the backbone (``model.backbone.body``) follows the method.
    Validation and test report COCO box AP (and mask AP for mask models) through torchmetrics'
    ``MeanAveragePrecision`` with the faster-coco-eval backend: ``val/map`` (AP@[.5:.95]),
    ``val/map_50``, ``val/map_75``, and ``val/segm_map`` ... for masks.

    Args:
        detector: Which detector.
        num_classes: Object classes without the background; taken from the data when left out.
        min_size: The detector transform's shorter side (torchvision ``min_size``).
        max_size: Its longest side.
        detector_kwargs: Extra arguments of the torchvision detector.
        **kwargs: Backbone, method and optimiser arguments of :class:`~monatune.engine.TunedModule`.
    """

    def __init__(
        self,
        backbone: str,
        *,
        detector: str = "retinanet",
        num_classes: int | None = None,
        min_size: int | tuple[int, ...] = 800,
        max_size: int = 1333,
        detector_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if detector not in DETECTORS:
            raise ValueError(f"unknown detector {detector!r}; choose from {DETECTORS}")
        super().__init__(backbone, **kwargs)
        self.detector, self.num_classes = detector, num_classes
        self.min_size, self.max_size = min_size, max_size
        self.detector_kwargs = dict(detector_kwargs or {})
        self.masks = detector in ("mask_rcnn", "cascade_mask_rcnn")

    monitor = "val/map"

    def build_network(self) -> nn.Module:
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if self.num_classes is None:
            self.num_classes = getattr(data, "num_classes", None)
        if not self.num_classes:
            raise ValueError("`num_classes` is not set and the data module does not provide it")
        iou = ("bbox", "segm") if self.masks else ("bbox",)
        self.val_metric = MeanAveragePrecision(iou_type=iou, backend="faster_coco_eval")
        self.test_metric = MeanAveragePrecision(iou_type=iou, backend="faster_coco_eval")
        return build_detector(
            self.detector, self.backbone_name, num_classes=self.num_classes,
            model_kwargs={**self.model_kwargs, "drop_path_rate": self.drop_path_rate},
            min_size=self.min_size, max_size=self.max_size, **self.detector_kwargs,
        )

    def tuned_part(self, network: nn.Module) -> nn.Module:
        return network.backbone.body

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return self.model(images)

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

    def _evaluate(self, batch: dict[str, Any], metric: MeanAveragePrecision) -> None:
        if not batch.get("images"):
            return
        preds = self.model([im.as_subclass(Tensor) for im in batch["images"]])
        targets = [_plain(t, training=False) for t in batch["targets"]]
        for p, t in zip(preds, targets):
            if self.masks:
                p["masks"] = p["masks"][:, 0] > 0.5  # N, H, W
                t["masks"] = t["masks"].bool()
            else:
                t.pop("masks", None)
            t["iscrowd"] = t.get("iscrowd", torch.zeros(len(t["labels"]), dtype=torch.int64))
        metric.update(preds, targets)

    def _log_metric(self, metric: MeanAveragePrecision, stage: str) -> None:
        values = metric.compute()  # gathers every process's detections
        metric.reset()
        for key in ("map", "map_50", "map_75"):
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
