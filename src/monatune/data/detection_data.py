"""The Lightning data module of object detection and instance segmentation: COCO and Pascal VOC folders."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from .classification import VOC_CLASSES
from .classification_data import ImageFiles
from .detection import (
    COCO_CROP_RANGE,
    COCO_CROP_SCALES,
    DetectionDataset,
    collate_detection,
    detection_transforms,
    read_coco,
    read_voc,
)
from .images import Skipped, _check_on_bad_image
from .loading import ShardedDataModule

__all__ = ["DetectionData", "DEFAULT_DETECTION_SPLITS"]

DEFAULT_DETECTION_SPLITS = {
    "coco": ("train2017", "val2017", "val2017"),
    "voc": ("2007/trainval+2012/trainval", "2007/test", "2007/test"),
}
_TEST_SCALE = {"coco": (800, 1333), "voc": (600, 1000)}  # (shorter side, longest side) the detector resizes to


def parse_voc_split(split: str) -> list[tuple[str, str]]:
    """``"2007/trainval+2012/trainval"`` -> ``[("2007", "trainval"), ("2012", "trainval")]``."""
    pairs = []
    for part in split.split("+"):
        year, _, image_set = part.strip().partition("/")
        if not year or not image_set:
            raise ValueError(f"VOC split {split!r}: write each part as YEAR/IMAGE_SET, e.g. '2007/trainval+2012/trainval'")
        pairs.append((year, image_set))
    return pairs


class _Repeated(Dataset):
    """``times`` passes over a data set as one epoch (mmdetection's ``RepeatDataset``)."""

    def __init__(self, dataset: Dataset, times: int) -> None:
        self.dataset, self.times = dataset, times

    def __len__(self) -> int:
        return len(self.dataset) * self.times  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i % len(self.dataset)]  # type: ignore[arg-type]


class _Unannotated(Dataset):
    """Images without annotations (``predict``) as detection items with empty targets."""

    def __init__(self, files: ImageFiles) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Any, dict[str, Any]] | Skipped:
        item = self.files[i]
        if isinstance(item, Skipped):
            return item
        image = item[0]
        h, w = image.shape[-2:]
        target = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
                  "labels": torch.zeros(0, dtype=torch.int64), "image_id": i, "path": self.files.path(i)}
        return image, target


def _to_float_image(image: Any) -> tv_tensors.Image:
    return tv_tensors.Image(F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True))


class DetectionData(ShardedDataModule):
    """Detection data from a local COCO or Pascal VOC folder, loaded the way the release trains.

    ``format="coco"``: ``root/<split>/`` image folders and ``root/annotations/instances_<split>.json``
    (COCO's own layout; ``annotations`` points elsewhere), boxes, polygon and RLE masks, crowd flags.
    ``format="voc"``: ``root`` holds ``VOCdevkit/VOC<year>/``; a split is ``YEAR/IMAGE_SET`` or several
    joined by ``+`` (``"2007/trainval+2012/trainval"``), difficult objects flagged.

    Training images get the release's augmentation (:func:`~monatune.data.detection_transforms`);
    evaluation images keep their size and the detector resizes them to ``test_scale`` /
    ``max_size`` (the task reads those from here), so that boxes, masks and metrics are in the
    original image's pixels.

    Args:
        root: The data set's folder.
        format: ``coco`` or ``voc``.
        splits: ``(train, val, test)``; COCO: folder names under ``root``; VOC: see above.
            Defaults: ``train2017, val2017, val2017`` and ``2007/trainval+2012/trainval, 2007/test, 2007/test``.
        annotations: COCO only: the three splits' JSON files (relative to ``root`` or absolute).
        classes: VOC only: the object names (default: the 20 VOC classes).
        masks: COCO only: read the instance masks (Mask R-CNN, Cascade Mask R-CNN need them).
        metric: ``coco`` (box and mask AP@[.5:.95]) or ``voc`` (VOC mAP@0.5); default: the format's.
        batch_size: Images per step and process.
        num_workers: Loader worker processes.
        train_scales: Shorter sides of the training resize (default: COCO 480..800 step 32, VOC 600).
        max_size: The longest side, training and test (default: COCO 1333, VOC 1000).
        test_scale: The shorter side the detector resizes evaluation images to (COCO 800, VOC 600).
        crop: The COCO crop policy as one of the two training policies (default: for COCO).
        crop_scales: Shorter sides before that crop.
        crop_range: The crop's smallest and largest side.
        hflip: Random horizontal flips in training.
        repeats: Passes over the training set per epoch (the release's VOC schedule: 3).
        filter_empty_gt: Train only on images with at least one annotation and a shorter side of at
            least 32 px, as mmdetection 2.x's data sets do (``filter_empty_gt=True``); the number left
            out is ``train_filtered``. Evaluation splits are never filtered.
        on_bad_annotation: ``drop`` (default: skip it, count it, warn once) or ``error`` (stop).
        on_bad_image: ``error`` (stop, naming the file) or ``skip`` (drop it and count it).
        predict_path: Image file or folder for ``predict`` (default: the test split).
        seed: Seeds the shuffling and augmentation (with the epoch), for reproducible resumes.
    """

    resizes_training_images = True  # the detector skips its own training resize

    def __init__(
        self,
        root: str,
        *,
        format: str = "coco",
        splits: tuple[str, str, str] | None = None,
        annotations: tuple[str, str, str] | None = None,
        classes: list[str] | None = None,
        masks: bool = True,
        metric: str | None = None,
        batch_size: int = 2,
        num_workers: int = 2,
        train_scales: list[int] | None = None,
        max_size: int | None = None,
        test_scale: int | None = None,
        crop: bool | None = None,
        crop_scales: list[int] = list(COCO_CROP_SCALES),
        crop_range: tuple[int, int] = COCO_CROP_RANGE,
        hflip: bool = True,
        repeats: int = 1,
        filter_empty_gt: bool = True,
        on_bad_annotation: str = "drop",
        on_bad_image: str = "error",
        predict_path: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if format not in DEFAULT_DETECTION_SPLITS:
            raise ValueError(f"unknown detection format {format!r}; choose from {tuple(DEFAULT_DETECTION_SPLITS)}")
        if metric not in (None, "coco", "voc"):
            raise ValueError(f"unknown detection metric {metric!r}; choose 'coco' or 'voc'")
        if batch_size < 1 or repeats < 1:
            raise ValueError(f"`batch_size` and `repeats` must be at least 1, got {batch_size} and {repeats}")
        _check_on_bad_image(on_bad_image)
        if not Path(root).expanduser().exists():
            raise FileNotFoundError(f"data folder '{root}' does not exist; set `data.root` to your data set's folder")
        if annotations is not None and (format != "coco" or len(annotations) != 3):
            raise ValueError("`annotations` takes the three COCO splits' JSON files (train, val, test)")
        self.root, self.format = Path(root).expanduser(), format
        self.splits = tuple(splits) if splits else DEFAULT_DETECTION_SPLITS[format]
        if len(self.splits) != 3:
            raise ValueError(f"`splits` takes three names (train, val, test), got {list(self.splits)}")
        self.annotations, self.masks = annotations, masks and format == "coco"
        self.voc_classes = list(classes) if classes else list(VOC_CLASSES)
        self.metric = metric or format
        self.batch_size, self.num_workers, self.repeats, self.seed = batch_size, num_workers, repeats, seed
        self.on_bad_annotation, self.on_bad_image, self.predict_path = on_bad_annotation, on_bad_image, predict_path
        default_scale, default_max = _TEST_SCALE[format]
        self.test_scale, self.max_size = test_scale or default_scale, max_size or default_max
        self.train_transform = detection_transforms(
            True, kind=format, scales=train_scales, max_size=self.max_size, crop=crop,
            crop_scales=crop_scales, crop_range=crop_range, hflip=hflip,
        )  # fmt: skip
        self.eval_transform = detection_transforms(False, kind=format)
        # read the annotations now so that a wrong folder or a malformed file stops the run before it starts
        self.train_set = self._read(0, self.train_transform)
        self.filter_empty_gt, self.train_filtered = filter_empty_gt, 0
        if filter_empty_gt:
            self.train_set, self.train_filtered = self.train_set.training_subset()
            if len(self.train_set) == 0:
                raise ValueError(f"training split {self.splits[0]!r} has no image with an annotation (and a side of "
                                 "32 px or more) to train on; check the annotations, or set filter_empty_gt: false")
        self.val_set = self._read(1, self.eval_transform)
        self._test_set: DetectionDataset | None = self.val_set if self.splits[2] == self.splits[1] else None
        self._check_classes(self.val_set, self.splits[1])

    def _read(self, k: int, transform: Callable) -> DetectionDataset:
        split = self.splits[k]
        options = dict(on_bad_annotation=self.on_bad_annotation, on_bad_image=self.on_bad_image, transforms=transform)
        if self.format == "voc":
            return read_voc(self.root, parse_voc_split(split), classes=self.voc_classes, **options)
        json_file = self.root / "annotations" / f"instances_{split}.json"
        if self.annotations is not None:
            given = Path(self.annotations[k]).expanduser()
            json_file = given if given.is_absolute() else self.root / given
        return read_coco(self.root / split, json_file, masks=self.masks, **options)

    def _check_classes(self, dataset: DetectionDataset, split: str) -> None:
        if dataset.classes != self.train_set.classes:
            raise ValueError(f"split {split!r} has categories {dataset.classes[1:]} but {self.splits[0]!r} has "
                             f"{self.train_set.classes[1:]}; a model trains and evaluates on one list")  # fmt: skip

    @property
    def test_set(self) -> DetectionDataset:
        """The test split, read when first needed (a data set may have none to ``fit``)."""
        if self._test_set is None:
            self._test_set = self._read(2, self.eval_transform)
            self._check_classes(self._test_set, self.splits[2])
        return self._test_set

    @property
    def classes(self) -> list[str]:
        """Object class names; label ``k`` is ``classes[k - 1]``."""
        return self.train_set.classes[1:]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def eval_size(self) -> tuple[int, int]:
        """``(shorter side, longest side)`` the detector resizes evaluation images to."""
        return self.test_scale, self.max_size

    collate = staticmethod(collate_detection)

    def train_items(self) -> Dataset:
        return _Repeated(self.train_set, self.repeats) if self.repeats > 1 else self.train_set

    def predict_set(self) -> Dataset:
        if self.predict_path is None:
            return self.test_set
        return _Unannotated(ImageFiles(self.predict_path, _to_float_image, self.on_bad_image))
