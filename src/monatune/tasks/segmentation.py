"""Semantic segmentation: UperNet with an auxiliary FCN head on a tuned backbone, mIoU."""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from ..engine.module import TunedModule
from ..models.segmentation import build_segmenter

__all__ = ["SemanticSegmenter", "slide_inference", "palette", "draw_segmentation"]

INFERENCE = ("whole", "slide")


def slide_inference(
    forward: Any, image: Tensor, num_classes: int, crop: tuple[int, int], stride: tuple[int, int]
) -> Tensor:
    """mmsegmentation's sliding-window inference: average the logits of overlapping ``crop`` windows.

    Args:
        forward: ``images [1, 3, h, w] -> logits [1, C, h, w]``.
        image: ``[1, 3, H, W]``.
        num_classes: ``C``.
        crop: Window ``(height, width)``; an image smaller than it is one window of its own size.
        stride: Step between windows.

    Returns:
        Logits ``[1, C, H, W]``.
    """
    _, _, h, w = image.shape
    (ch, cw), (sh, sw) = crop, stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    logits = image.new_zeros((1, num_classes, h, w))
    count = image.new_zeros((1, 1, h, w))
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            logits[:, :, y1:y2, x1:x2] += forward(image[:, :, y1:y2, x1:x2]).float()
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def palette(num_classes: int) -> np.ndarray:
    """``[num_classes, 3]`` uint8 colours, distinct and fixed per class index."""
    colours = [colorsys.hsv_to_rgb((k * 0.61803398875) % 1.0, 0.65 + 0.35 * (k % 2), 0.95) for k in range(num_classes)]
    return (np.array(colours) * 255).round().astype(np.uint8)


def draw_segmentation(row: dict[str, Any], alpha: float = 0.5) -> Any:
    """The image of a ``predict`` row with its predicted classes blended over it in colour (a PIL image)."""
    from PIL import Image

    from ..data.images import read_rgb

    image = np.asarray(read_rgb(row["path"]), dtype=np.float32)  # 16-bit and float images as the model saw them
    with Image.open(row["mask"]) as m:
        labels = np.asarray(m, dtype=np.int64)
    colours = palette(row["num_classes"])[labels.clip(0, row["num_classes"] - 1)].astype(np.float32)
    return Image.fromarray((image * (1 - alpha) + colours * alpha).round().astype(np.uint8))


class SemanticSegmenter(TunedModule):
    """UperNet (pyramid pooling + FPN, 512 channels) and an auxiliary FCN head on a tuned backbone.

    The release's ADE20K model (mmsegmentation): the decode head reads all four stages, the
    auxiliary head the third with loss weight 0.4; cross-entropy ignores label 255 and is averaged
    over all pixels, ignored ones included (mmsegmentation 0.x's ``avg_non_ignore=False``, which
    the release ran; ``avg_non_ignore=True`` averages over labelled pixels only). The backbone
    (``model.backbone``) follows the method; the heads train fully.

    Evaluation predicts each image at the size the data module resized it to, ``whole`` or by
    sliding ``crop``-sized windows ``stride`` apart, resizes the logits to the label map's own size
    (the original image's) and scores ``val/mIoU`` (torchmetrics' ``MulticlassJaccardIndex``: a
    data-set-level confusion matrix, label 255 ignored, classes absent from both prediction and
    ground truth left out of the mean) and ``val/aAcc`` (pixel accuracy).

    Args:
        num_classes: Classes (ADE20K: 150); taken from the data when left out.
        channels: UperNet width (512).
        aux_channels: Auxiliary head width (256); ``aux_weight: 0`` drops the auxiliary head.
        aux_weight: Weight of the auxiliary loss (0.4).
        dropout: Dropout before the classifiers (0.1).
        avg_non_ignore: Average the loss over labelled pixels only.
        inference: ``whole`` or ``slide``.
        crop: Sliding window ``(height, width)``; default: the data's crop size, else 512 x 512.
        stride: Step between windows; default: two thirds of the window (mmsegmentation's 341 for 512).
        ignore_index: The label that is not scored (255).
        **kwargs: Backbone, method and optimiser arguments of :class:`~monatune.engine.TunedModule`.
    """

    def __init__(
        self,
        backbone: str,
        *,
        num_classes: int | None = None,
        channels: int = 512,
        aux_channels: int = 256,
        aux_weight: float = 0.4,
        dropout: float = 0.1,
        avg_non_ignore: bool = False,
        inference: str = "whole",
        crop: tuple[int, int] | None = None,
        stride: tuple[int, int] | None = None,
        ignore_index: int = 255,
        **kwargs: Any,
    ) -> None:
        if inference not in INFERENCE:
            raise ValueError(f"unknown inference mode {inference!r}; choose from {INFERENCE}")
        super().__init__(backbone, **kwargs)
        self.num_classes, self.channels, self.aux_channels = num_classes, channels, aux_channels
        self.aux_weight, self.dropout, self.avg_non_ignore = aux_weight, dropout, avg_non_ignore
        self.inference, self.crop, self.stride, self.ignore_index = inference, crop, stride, ignore_index
        self.classes: list[str] | None = None

    monitor = "val/mIoU"

    def build_network(self) -> nn.Module:
        data = self._classes_from_data()
        self.crop = tuple(self.crop or getattr(data, "crop_size", None) or (512, 512))
        self.stride = tuple(self.stride or (max(self.crop[0] * 2 // 3, 1), max(self.crop[1] * 2 // 3, 1)))
        self.val_iou, self.test_iou = self._iou(), self._iou()
        self.val_acc, self.test_acc = self._acc(), self._acc()
        return build_segmenter(
            self.backbone_name, num_classes=self.num_classes,
            model_kwargs={**self.model_kwargs, "drop_path_rate": self.drop_path_rate},
            channels=self.channels, aux_channels=self.aux_channels, aux=self.aux_weight > 0, dropout=self.dropout,
        )  # fmt: skip

    def _iou(self) -> MulticlassJaccardIndex:
        return MulticlassJaccardIndex(self.num_classes, average="macro", ignore_index=self.ignore_index)

    def _acc(self) -> MulticlassAccuracy:
        return MulticlassAccuracy(self.num_classes, average="micro", ignore_index=self.ignore_index)

    def tuned_part(self, network: nn.Module) -> nn.Module:
        return network.backbone

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, C, H, W]`` at the input's size."""
        return self.model(images)["out"]

    def loss(self, logits: Tensor, masks: Tensor) -> Tensor:
        per_pixel = F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index, reduction="none")
        if self.avg_non_ignore:
            return per_pixel.sum() / (masks != self.ignore_index).sum().clamp(min=1)
        return per_pixel.mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        images = batch.get("images")
        if images is None or not len(images):
            return None
        images = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
        masks = torch.stack(list(batch["masks"])) if isinstance(batch["masks"], (list, tuple)) else batch["masks"]
        n = len(images)
        if n == 1:
            images, masks = self._pair_lone_image(images, masks, batch)
        out = self.model(images)
        decode = self.loss(out["out"], masks)
        loss = decode
        if "aux" in out:
            aux = self.loss(out["aux"], masks)
            loss = decode + self.aux_weight * aux
            self.log("train/loss_aux", aux, batch_size=n)
        self.log("train/loss_decode", decode, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def _pair_lone_image(self, images: Tensor, masks: Tensor, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """A training batch of one image, as a batch of that image twice.

        BatchNorm in training normalises each channel over the batch, and the pyramid pooling's 1x1 bin
        gives one value per channel and image, so one image fails ("Expected more than 1 value per
        channel"). Twice the same image has the one image's batch statistics and, dropout aside, its loss
        and gradients; the data module's full batches make this happen only where ``on_bad_image=skip``
        left one image of a batch. A batch size of 1 is refused.
        """
        if not batch.get("skipped"):
            raise ValueError(
                "segmentation training needs at least 2 images per batch and process (BatchNorm in the UperNet "
                "head cannot normalise a batch of one image), but got a batch of 1; set data.batch_size to 2 or "
                "more (the release: 2 per GPU)"
            )
        if not getattr(self, "_warned_lone_image", False):
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"on_bad_image=skip left a training batch with one image ('{batch['paths'][0]}'); "
                           "it is trained as a batch of that image twice, as BatchNorm needs two (said once)")
            self._warned_lone_image = True
        return images.repeat(2, 1, 1, 1), masks.repeat(2, 1, 1)

    def predict_logits(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        """Logits ``[C, *size]`` of one image ``[3, h, w]`` (whole or sliding), resized to ``size``."""
        image = image[None]
        if self.inference == "slide":
            logits = slide_inference(self, image, self.num_classes, self.crop, self.stride)
        else:
            logits = self(image).float()
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits[0]

    def _evaluate(self, batch: dict[str, Any], iou: MulticlassJaccardIndex, acc: MulticlassAccuracy, stage: str) -> None:
        images = batch.get("images")
        if images is None or not len(images):
            return
        for image, mask in zip(images, batch["masks"]):
            pred = self.predict_logits(image, tuple(mask.shape[-2:])).argmax(0)
            iou.update(pred[None], mask[None])
            acc.update(pred[None], mask[None])
        # logging the metric objects lets torchmetrics gather their state across processes
        self.log(f"{stage}/mIoU", iou, prog_bar=True, on_step=False, on_epoch=True)
        self.log(f"{stage}/aAcc", acc, on_step=False, on_epoch=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_iou, self.val_acc, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_iou, self.test_acc, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per image: ``path``, ``mask`` (an index PNG of the predicted classes, at the image's size,
        under ``<run>/predict/masks/``) and the classes it shows, with their pixel fractions."""
        from PIL import Image

        images = batch.get("images")
        if images is None or not len(images):
            return []
        out_dir = Path(self.trainer.default_root_dir) / "masks"
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for image, path, mask in zip(images, batch["paths"], batch["masks"]):  # the mask gives the original size
            labels = self.predict_logits(image, tuple(mask.shape[-2:])).argmax(0).cpu().numpy()
            mask_file = out_dir / f"{Path(path).stem}.png"
            mode = "L" if self.num_classes <= 256 else "I"
            Image.fromarray(labels.astype(np.uint8 if mode == "L" else np.int32), mode=mode).save(mask_file)
            found, counts = np.unique(labels, return_counts=True)
            order = np.argsort(-counts)
            rows.append({
                "path": path, "mask": str(mask_file), "num_classes": self.num_classes,
                "classes": [{"label": int(found[i]), "name": self._name(int(found[i])),
                             "fraction": round(float(counts[i] / labels.size), 4)} for i in order],
            })  # fmt: skip
        return rows

    def _name(self, label: int) -> str:
        return self.classes[label] if self.classes and label < len(self.classes) else str(label)

    def draw_prediction(self, row: dict[str, Any]) -> Any:
        """The image with the predicted classes blended over it (a PIL image)."""
        return draw_segmentation(row)
