"""Oriented (rotated-box) object detection on a tuned backbone: rotated mAP, DOTA submissions.

The paper's DOTA-v1.0 and STAR experiments (spec ``oriented-spec.md``) with the detectors of the
authors' STAR-MMRotate code (:mod:`monatune.models.oriented`): H2RBox-v2+, which learns rotated boxes
from horizontal-box labels, and the fully supervised Oriented R-CNN and rotated RetinaNet (with the
KLD loss as an option). The data module gives them the release's pipeline
(:class:`~monatune.data.OrientedData`), and evaluation follows the release:

- split patches (DOTA): each patch is scored on its own by rotated mAP@0.5 (``val/rmap50``), as
  mmrotate evaluates the ``trainval`` patches; ``test`` also merges the patches of each image
  (per-class rotated NMS 0.1) and writes the evaluation server's Task1 files, and with
  ``devkit_labels`` scores the merged detections against the original ``labelTxt`` files the
  way the DOTA devkit does (``test/devkit_map50``);
- full images (STAR): sliding 1024 windows, merged at 0.4 (class-agnostic for the single-stage
  detectors, per class for Oriented R-CNN; :func:`~monatune.tasks.oriented_windows.detect_full_image`),
  scored by rotated mAP@0.5.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..engine.module import TunedModule
from ..ops import cxcywhr_to_le90, le90_to_cxcywhr, le90_to_polygons
from .detection import _colour
from .oriented_windows import detect_full_image, merge_patches

__all__ = ["OrientedDetector", "draw_oriented"]

DETECTORS = ("h2rbox_v2p", "rotated_retinanet", "oriented_rcnn")
BOX_LOSSES = ("l1", "kld")


def _le90_target(target: dict[str, Any]) -> dict[str, Tensor]:
    return {"boxes": cxcywhr_to_le90(target["boxes"].as_subclass(Tensor).float()), "labels": target["labels"]}


class OrientedDetector(TunedModule):
    """A rotated-box detector (``h2rbox_v2p``, ``rotated_retinanet``, ``oriented_rcnn``) on a tuned backbone.

    The FPN and head train fully; the backbone (``model.backbone.body``) follows the method.
    Boxes inside are mmrotate's le90 ``(cx, cy, w, h, theta)`` (radians, clockwise on screen);
    ``predict`` writes torchvision's ``CXCYWHR`` (degrees, counter-clockwise) and the 4 corners.

    Args:
        detector: Which detector: ``h2rbox_v2p`` (H2RBox-v2+, trained from horizontal boxes: give the
            data ``horizontal_boxes: true``), ``rotated_retinanet`` (anchors with angle 0, 'oc' boxes
            inside) or ``oriented_rcnn`` (oriented RPN + rotated RoI head), both trained on rotated boxes.
        num_classes: Object classes; taken from the data when left out.
        square_classes: (H2RBox-v2+) Class names whose boxes the detector treats as squares (angle 0;
            the release: DOTA baseball-diamond, storage-tank, roundabout; STAR tank, roundabout).
        resize_classes: (H2RBox-v2+) Class names whose predicted w and h shrink by 0.85 (DOTA
            baseball-diamond).
        prob_rot: (H2RBox-v2+) Chance of the rotated self-supervised view (else the flipped one).
        view_range: (H2RBox-v2+) The rotated view's angle range, as fractions of pi.
        box_loss: (rotated RetinaNet) ``l1`` on the deltas, or ``kld`` (the Gaussian Kullback-Leibler
            loss between decoded and ground-truth boxes, the release's ``GDLoss_v1``).
        assign_by_circumhbbox: (rotated RetinaNet) Assign anchors by IoU with the ground truth's
            circumscribed horizontal box (the release's ``hbb`` and KLD configs) instead of the rotated box.
        fpn_channels: Width of the FPN and the head.
        score_threshold: Candidates score above this before NMS.
        nms_pre: Candidates kept per level before NMS (Oriented R-CNN: the RPN's anchors per level).
        max_proposals: (Oriented R-CNN) Proposals the RPN keeps per image after its NMS (2000, the release's).
        nms_iou: IoU of the detector's per-class rotated NMS.
        max_per_image: Detections kept per image (or window).
        test_size: Resize evaluation images so the long side is this (DOTA: 1024), or not (STAR: None).
        size_divisor: Images are padded to a multiple of this (32).
        full_image_divisor: A full image is padded to a multiple of this before its windows are cut (64).
        window_size: Side of the sliding windows of full-image inference.
        window_gap: Their overlap.
        window_rate_threshold: Windows with no more than this share inside the image are dropped.
        window_batch: Windows per forward pass.
        window_merge_iou: IoU of the merge of window detections (0.4).
        window_merge_per_class: Merge window detections by per-class NMS (the release's two-stage
            detectors) instead of class-agnostic (single-stage); default: per class for ``oriented_rcnn``.
        patch_merge_iou: IoU of the per-class merge of split patches into their image (0.1).
        ap_method: ``11point`` (VOC07, as mmrotate) or ``area``.
        submission: ``test`` writes the DOTA server's Task1 files of the merged patches (default:
            for DOTA data given as patches).
        devkit_labels: The original (unsplit) ``labelTxt`` folder of the test images: ``test``
            then also scores the merged detections as the DOTA devkit does.
        predict_threshold: ``predict`` keeps detections scoring at least this.
        **kwargs: Backbone, method and optimiser arguments of :class:`~monatune.engine.TunedModule`.
    """

    def __init__(
        self,
        backbone: str,
        *,
        detector: str = "h2rbox_v2p",
        num_classes: int | None = None,
        square_classes: list[str] | None = None,
        resize_classes: list[str] | None = None,
        prob_rot: float = 0.95,
        view_range: tuple[float, float] = (0.25, 0.75),
        box_loss: str = "l1",
        assign_by_circumhbbox: bool = False,
        fpn_channels: int = 256,
        score_threshold: float = 0.05,
        nms_pre: int = 2000,
        max_proposals: int = 2000,
        nms_iou: float = 0.1,
        max_per_image: int = 2000,
        test_size: int | None = None,
        size_divisor: int = 32,
        full_image_divisor: int = 64,
        window_size: int = 1024,
        window_gap: int = 200,
        window_rate_threshold: float = 0.6,
        window_batch: int = 4,
        window_merge_iou: float = 0.4,
        window_merge_per_class: bool | None = None,
        patch_merge_iou: float = 0.1,
        ap_method: str = "11point",
        submission: bool | None = None,
        devkit_labels: str | None = None,
        predict_threshold: float = 0.3,
        **kwargs: Any,
    ) -> None:
        if detector not in DETECTORS:
            raise ValueError(f"unknown oriented detector {detector!r}; choose from {DETECTORS}")
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"unknown box_loss {box_loss!r}; choose from {BOX_LOSSES}")
        if detector != "rotated_retinanet" and (box_loss != "l1" or assign_by_circumhbbox):
            raise ValueError(f"box_loss and assign_by_circumhbbox are options of rotated_retinanet, not {detector}")
        if detector != "oriented_rcnn" and max_proposals != 2000:
            raise ValueError(f"max_proposals is an option of oriented_rcnn, not {detector}")
        if detector != "h2rbox_v2p" and (square_classes or resize_classes):
            raise ValueError(f"square_classes and resize_classes are options of h2rbox_v2p, not {detector}")
        if ap_method not in ("11point", "area"):
            raise ValueError(f"ap_method must be '11point' or 'area', got {ap_method!r}")
        if not 0 < window_gap < window_size or window_batch < 1:
            raise ValueError(f"need 0 < window_gap < window_size and window_batch >= 1, got gap {window_gap}, "
                             f"size {window_size}, batch {window_batch}")  # fmt: skip
        if devkit_labels is not None and not Path(devkit_labels).is_dir():
            raise FileNotFoundError(f"devkit_labels '{devkit_labels}' is not a folder; give the original labelTxt folder")
        super().__init__(backbone, **kwargs)
        self.detector, self.num_classes = detector, num_classes
        self.square_names, self.resize_names = list(square_classes or []), list(resize_classes or [])
        self.prob_rot, self.view_range, self.fpn_channels = prob_rot, tuple(view_range), fpn_channels
        self.box_loss, self.assign_by_circumhbbox = box_loss, bool(assign_by_circumhbbox)
        self.score_threshold, self.nms_pre, self.nms_iou, self.max_per_image = score_threshold, nms_pre, nms_iou, max_per_image
        self.max_proposals = max_proposals
        self.test_size, self.size_divisor, self.full_image_divisor = test_size, size_divisor, full_image_divisor
        self.window = dict(size=window_size, gap=window_gap, rate_threshold=window_rate_threshold, batch=window_batch,
                           merge_iou=window_merge_iou, pad_divisor=full_image_divisor,
                           per_class=detector == "oriented_rcnn" if window_merge_per_class is None
                           else bool(window_merge_per_class))  # fmt: skip
        self.patch_merge_iou, self.ap_method = patch_merge_iou, ap_method
        self.submission, self.devkit_labels, self.predict_threshold = submission, devkit_labels, predict_threshold
        self.classes: list[str] | None = None
        self._patches: list[tuple[str, dict[str, Tensor]]] = []

    monitor = "val/rmap50"

    # -- building -------------------------------------------------------------------------
    def _labels_of(self, names: list[str], what: str) -> list[int]:
        if not names:
            return []
        if not self.classes:
            raise ValueError(f"{what} names classes, but the data gives no class names")
        unknown = [n for n in names if n not in self.classes]
        if unknown:
            raise ValueError(f"{what} {unknown} are not among the data's classes ({', '.join(self.classes[:8])}, ...)")
        return [self.classes.index(n) + 1 for n in names]

    def build_network(self) -> nn.Module:
        from ..models import oriented

        data = self._classes_from_data()
        if self.detector != "h2rbox_v2p" and getattr(data, "horizontal_boxes", False):
            raise ValueError(f"{self.detector} learns from rotated boxes, but the data gives horizontal ones; "
                             "set data.init_args.horizontal_boxes: false")  # fmt: skip
        self.full_images = bool(getattr(data, "full_images", False))
        if self.submission is None:
            self.submission = getattr(data, "format", None) == "dota" and not self.full_images
        self.val_metric, self.test_metric = self._new_metric(), self._new_metric()
        common = dict(
            num_classes=self.num_classes, model_kwargs={**self.model_kwargs, "drop_path_rate": self.drop_path_rate},
            fpn_channels=self.fpn_channels, score_threshold=self.score_threshold, nms_iou=self.nms_iou,
            max_per_image=self.max_per_image, test_size=self.test_size, size_divisor=self.size_divisor,
        )  # fmt: skip
        if self.detector == "oriented_rcnn":
            return oriented.build_oriented_rcnn(self.backbone_name, **common, rpn_nms_pre=self.nms_pre,
                                                rpn_max_proposals=self.max_proposals)
        if self.detector == "rotated_retinanet":
            return oriented.build_rotated_retinanet(
                self.backbone_name, **common, nms_pre=self.nms_pre, box_loss=self.box_loss,
                assign_by_circumhbbox=self.assign_by_circumhbbox,
            )  # fmt: skip
        return oriented.build_h2rbox(
            self.backbone_name, **common, nms_pre=self.nms_pre,
            square_classes=self._labels_of(self.square_names, "square_classes"),
            resize_classes=self._labels_of(self.resize_names, "resize_classes"),
            prob_rot=self.prob_rot, view_range=self.view_range,
        )  # fmt: skip

    def _new_metric(self) -> nn.Module:
        from ..metrics.rotated import RotatedMeanAveragePrecision

        return RotatedMeanAveragePrecision(self.num_classes, ap_method=self.ap_method)

    def tuned_part(self, network: nn.Module) -> nn.Module:
        return network.backbone.body

    def compiled_part(self, network: nn.Module) -> nn.Module:
        return network.backbone  # the tuned body and the FPN; the heads' sampling and NMS change shape with the data

    def use_size_buckets(self, network: nn.Module, buckets: int | tuple[int, ...] | None) -> None:
        network.size_buckets = buckets

    # -- steps ----------------------------------------------------------------------------
    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return self.model([im.as_subclass(Tensor) for im in images])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        if not batch.get("images"):
            return None
        targets = [_le90_target(t) for t in batch["targets"]]
        losses = self.model([im.as_subclass(Tensor) for im in batch["images"]], targets)
        loss = sum(losses.values())
        n = len(batch["images"])
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def _window_progress(self, chunks: Any, total: int) -> Any:
        if total < 8 or self._trainer is None or not self.trainer.is_global_zero:
            return chunks
        from tqdm import tqdm

        return tqdm(chunks, total=total, desc="windows", leave=False, unit="batch")

    def _detect_whole(self, path: str, *, windows: bool = True) -> dict[str, Tensor]:
        """Detections of the image file at ``path``: sliding windows, or (``windows=False``) one forward pass."""
        from ..data.large_images import LargeImage

        with LargeImage(path) as image:
            if windows:
                return detect_full_image(self, image, device=self.device, progress=self._window_progress, **self.window)
            pixels = torch.from_numpy(np.ascontiguousarray(image.read(0, 0, *image.size))).permute(2, 0, 1)
            return self._cpu(self([pixels.to(self.device, torch.float32) / 255])[0])

    @staticmethod
    def _cpu(det: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in det.items()}

    def _detect(self, batch: dict[str, Any]) -> list[dict[str, Tensor]]:
        """Detections of a batch's images in their pixels: one forward, or windows over whole images.

        Whole images are read by the task, so a file that turns out unreadable (damaged or truncated, found
        by :class:`~monatune.data.large_images.LargeImage` as it reads) is handled here as the loader handles
        its own: with the data's ``on_bad_image=skip`` it leaves the batch (``images``, ``targets``, ``paths``)
        and joins its ``skipped`` files, which are reported and counted; otherwise the run stops naming it.
        """
        if not (self.full_images or any(im is None for im in batch["images"])):
            return [self._cpu(d) for d in self(batch["images"])]
        from ..data.images import BadImageError

        found, keep = [], []
        for k, path in enumerate(batch["paths"]):
            try:
                found.append(self._detect_whole(path, windows=self.full_images))
            except BadImageError as e:
                self._skip_or_raise(batch, path, e)
                continue
            keep.append(k)
        if len(keep) < len(batch["paths"]):
            for key in ("images", "targets", "paths"):
                if key in batch:
                    batch[key] = [batch[key][k] for k in keep]
        return found

    def _skip_or_raise(self, batch: dict[str, Any], path: str, error: Exception) -> None:
        from ..data.images import BadImageError

        data = self._trainer.datamodule if self._trainer is not None else None
        if getattr(data, "on_bad_image", "error") != "skip":
            raise BadImageError(f"{error}; fix or remove it, or set data.init_args.on_bad_image=skip to leave "
                                "unreadable images out") from None  # fmt: skip
        batch.setdefault("skipped", []).append(path)

    def _evaluate(self, batch: dict[str, Any], metric: nn.Module, stage: str) -> None:
        if not batch.get("paths"):
            return
        preds = self._detect(batch)  # may leave unreadable whole images out of the batch
        if stage == "test" and (self.submission or self.devkit_labels):
            self._patches.extend((Path(p).stem, d) for p, d in zip(batch["paths"], preds))
        if getattr(self.trainer.datamodule, f"has_{stage}_annotations", True):
            metric.update(preds, [{k: v.cpu() for k, v in _le90_target(t).items()} for t in batch["targets"]])

    def _log_metric(self, metric: nn.Module, stage: str) -> None:
        if not getattr(self.trainer.datamodule, f"has_{stage}_annotations", True):
            metric.reset()
            return
        if metric.update_count == 0:
            metric.update([], [])  # a process that saw no image still needs typed states to gather
        values = metric.compute()
        metric.reset()
        self.log(f"{stage}/rmap50", values["map"].float(), prog_bar=True, sync_dist=False)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metric, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metric(self.val_metric, "val")

    def on_test_epoch_start(self) -> None:
        self._patches = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metric, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metric(self.test_metric, "test")
        if not (self.submission or self.devkit_labels):
            return
        patches = self._patches
        if self.trainer.world_size > 1:  # a patch's neighbours may have gone to other processes
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, patches)
            patches = [p for part in gathered for p in part]
        merged = merge_patches(patches, self.patch_merge_iou)
        self._patches = []
        from ..metrics.rotated import dota_devkit_map, task1_detections, write_task1

        names = self.classes or [str(k) for k in range(1, self.num_classes + 1)]
        detections = task1_detections(merged, names)
        if self.devkit_labels:
            from ..data.oriented import read_devkit_labels

            truth = read_devkit_labels(self.devkit_labels, sorted(merged))
            self.log("test/devkit_map50", float(dota_devkit_map(detections, truth, names)["map"]), sync_dist=False)
        if self.submission and self.trainer.is_global_zero:
            write_task1(detections, Path(self.trainer.default_root_dir) / "Task1", names)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per image: ``path`` and the detections scoring at least ``predict_threshold``: ``boxes``
        (``cx, cy, w, h, angle``: torchvision's CXCYWHR, degrees counter-clockwise on screen),
        ``polygons`` (the 4 corners ``x1, y1, ..., x4, y4``), ``labels``, ``names``, ``scores``.
        Images larger than a window (and every image of full-image data) are read in sliding windows;
        an unreadable one is skipped or stops the run as the data's ``on_bad_image`` says."""
        from ..data.images import BadImageError

        if not batch.get("paths"):
            return []
        rows = []
        for k, path in enumerate(batch["paths"]):
            image = batch["images"][k]
            if image is None:  # read by the task: in windows when larger than one (or for full-image data)
                from ..data.large_images import LargeImage

                try:
                    with LargeImage(path) as large:
                        whole = self.full_images or max(large.size) > self.window["size"]
                    det = self._detect_whole(path, windows=whole)
                except BadImageError as e:
                    self._skip_or_raise(batch, path, e)
                    continue
            else:
                det = self._cpu(self([image])[0])
            keep = det["scores"] >= self.predict_threshold
            boxes, labels = det["boxes"][keep], det["labels"][keep].tolist()
            rows.append({
                "path": path,
                "boxes": [[round(float(v), 2) for v in b] for b in le90_to_cxcywhr(boxes)],
                "polygons": [[round(float(v), 2) for v in p] for p in le90_to_polygons(boxes)],
                "labels": labels,
                "names": [self._name(label) for label in labels],
                "scores": [round(float(v), 4) for v in det["scores"][keep]],
            })  # fmt: skip
        return rows

    def _name(self, label: int) -> str:
        return self.classes[label - 1] if self.classes and 0 < label <= len(self.classes) else str(label)

    def draw_prediction(self, row: dict[str, Any]) -> Any:
        """The image of a ``predict`` row with its rotated boxes, names and scores drawn (a PIL image)."""
        return draw_oriented(row)


def draw_oriented(row: dict[str, Any], max_side: int = 4096) -> Any:
    """Draw a ``predict`` row's rotated boxes (its ``polygons``) and ``name score`` labels; a PIL image.

    Images larger than ``max_side`` are drawn shrunk to it (read window by window).
    """
    from torchvision.transforms.v2 import functional as F
    from torchvision.utils import draw_bounding_boxes

    from ..data.large_images import LargeImage

    with LargeImage(row["path"]) as image:
        width, height = image.size
        scale = min(1.0, max_side / max(width, height))
        picture = _shrunk(image, scale)
    polygons = torch.tensor(row["polygons"], dtype=torch.float32).reshape(-1, 8) * scale
    if len(polygons):
        text = [f"{n} {s:.2f}" for n, s in zip(row["names"], row["scores"])]
        thick = max(1, round(max(picture.shape[-2:]) / 400))
        picture = draw_bounding_boxes(picture, polygons, text, colors=[_colour(lb) for lb in row["labels"]], width=thick)
    return F.to_pil_image(picture)


def _shrunk(image: Any, scale: float, band: int = 2048) -> Tensor:
    """The image as uint8 ``[3, H, W]``, shrunk by ``scale`` band by band (a huge image is never whole)."""
    from PIL import Image

    width, height = image.size
    if scale >= 1.0:
        return torch.from_numpy(image.read(0, 0, width, height).copy()).permute(2, 0, 1)
    out_w = max(1, round(width * scale))
    parts = []
    for y in range(0, height, band):
        y2 = min(height, y + band)
        part = Image.fromarray(image.read(0, y, width, y2)).resize((out_w, max(1, round((y2 - y) * scale))), Image.BILINEAR)
        parts.append(torch.from_numpy(np.asarray(part).copy()).permute(2, 0, 1))
    return torch.cat(parts, dim=1)
