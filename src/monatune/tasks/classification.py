"""Image classification: a tuned timm classifier, single-label (top-1) or multi-label (mAP)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MultilabelAveragePrecision

from ..models.dense import create_timm_model
from ..engine.module import TunedModule

__all__ = ["ImageClassifier"]


def multilabel_probabilities(logits: Tensor) -> Tensor:
    """Float64 sigmoid of the logits: distinct for logits up to ~36 (float32's sigmoid is 1.0 from ~17)."""
    return torch.sigmoid(logits.detach().double())


def _check_image_size(network: nn.Module, name: str, image_size: int | tuple[int, int] | None) -> None:
    """A backbone with a fixed input size (timm's strict patch embedding: Swin, ViT, EVA) must get that size."""
    embed = getattr(network, "patch_embed", None)
    if image_size is None or embed is None or not getattr(embed, "strict_img_size", False):
        return
    want = tuple(embed.img_size)
    got = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if got != want:
        shown = want[0] if want[0] == want[1] else list(want)
        raise ValueError(
            f"data.init_args.image_size is {image_size} but {name} takes {want[0]}x{want[1]} images; set "
            f"data.init_args.image_size={shown}, or build the backbone for your size with "
            f"model.init_args.model_kwargs.img_size={image_size} (Swin: a window size that divides it)"
        )


class ImageClassifier(TunedModule):
    """Classify images with a tuned timm backbone; the classifier head trains with every method.

    Single-label data is scored by top-1 accuracy (``val/acc``); multi-label data (targets in
    {1, 0, -1 = ignore}, e.g. VOC 2007) by the mean of the per-class average precisions
    (``val/mAP``), entries marked -1 excluded, as the VOC protocol leaves out "difficult" objects.

    Args:
        num_classes: Number of classes; taken from the data module when left out.
        multilabel: Multi-label data; taken from the data module when left out.
        label_smoothing: Cross-entropy label smoothing (single-label only).
        top_k: How many classes ``predict`` reports per image.
        **kwargs: Backbone, method and optimiser arguments of :class:`~monatune.engine.TunedModule`.

    Example:
        >>> model = ImageClassifier("swin_large_patch4_window7_224", method="mona",
        ...                         pretrained="swin_large_patch4_window7_224_22k.pth", lr=6.25e-5)
        >>> lightning.Trainer(max_epochs=100).fit(model, ClassificationData("data/flowers102"))
    """

    def __init__(
        self,
        backbone: str,
        *,
        num_classes: int | None = None,
        multilabel: bool | None = None,
        label_smoothing: float = 0.0,
        top_k: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        self.num_classes, self.multilabel = num_classes, multilabel
        self.label_smoothing, self.top_k = label_smoothing, top_k
        self.classes: list[str] | None = None

    @property
    def monitor(self) -> str:
        """The validation metric that picks the best checkpoint (higher is better)."""
        return "val/mAP" if self.multilabel else "val/acc"

    def build_network(self) -> nn.Module:
        data = self._classes_from_data()
        if self.multilabel is None:
            self.multilabel = bool(getattr(data, "multilabel", False))
        self.val_metric, self.test_metric = self._metric(), self._metric()
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        network = create_timm_model(
            self.backbone_name,
            pretrained=False,
            num_classes=self.num_classes,
            drop_path_rate=self.drop_path_rate,
            **self.model_kwargs,
        )
        _check_image_size(network, self.backbone_name, getattr(data, "image_size", None))
        return network

    def _metric(self) -> nn.Module:
        if self.multilabel:
            return MultilabelAveragePrecision(num_labels=self.num_classes, average="macro", ignore_index=-1)
        return MulticlassAccuracy(num_classes=self.num_classes, average="micro")

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.multilabel:
            known = target >= 0  # -1: ignored (VOC "difficult")
            per_entry = F.binary_cross_entropy_with_logits(logits, target.clamp(min=0).float(), reduction="none")
            return (per_entry * known).sum() / known.sum().clamp(min=1)
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        if "image" not in batch:  # every image of the batch was unreadable and skipped
            return None
        loss = self.loss(self(batch["image"]), batch["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def _evaluate(self, batch: dict[str, Any], metric: nn.Module, loss: MeanMetric, stage: str) -> None:
        if "image" not in batch:
            return
        logits = self(batch["image"])
        target = batch["target"]
        loss.update(self.loss(logits, target), weight=len(target))
        if self.multilabel:
            # probabilities in float64, always: torchmetrics applies a sigmoid only to batches with a value
            # outside [0, 1], and float32's sigmoid ties every logit above ~17 at 1.0
            metric.update(multilabel_probabilities(logits), target.long())
        else:
            metric.update(logits.float(), target)
        name = "mAP" if self.multilabel else "acc"
        # logging the metric objects lets torchmetrics gather their state across processes
        self.log(f"{stage}/{name}", metric, prog_bar=True, on_step=False, on_epoch=True)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metric, self.val_loss, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metric, self.test_loss, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        if "image" not in batch:
            return []
        logits = self(batch["image"]).float()
        probs = logits.sigmoid() if self.multilabel else logits.softmax(-1)
        k = min(self.top_k, probs.shape[-1])
        scores, labels = probs.topk(k, dim=-1)
        names = self.classes or [str(i) for i in range(probs.shape[-1])]
        return [
            {
                "path": path,
                "top": [{"label": int(l), "name": names[int(l)], "score": round(float(s), 6)} for s, l in zip(ss, ls)],
            }
            for path, ss, ls in zip(batch["path"], scores.cpu(), labels.cpu())
        ]
