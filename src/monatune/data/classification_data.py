"""The Lightning data module of image classification: data sets, the release's transforms, loaders."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .classification import DEFAULT_SPLITS, FORMATS, build_classification_dataset, detect_format
from .images import Skipped, open_image
from .loading import ShardedDataModule

__all__ = ["ClassificationData", "ImageFiles", "IMAGENET_MEAN", "IMAGENET_STD", "classification_transforms"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def classification_transforms(
    train: bool,
    image_size: int,
    resize_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
) -> Callable:
    """The release's pipelines: RandomResizedCrop + flip to train; resize, centre crop to test."""
    if train:
        head = [v2.RandomResizedCrop(image_size, scale=crop_scale, interpolation=v2.InterpolationMode.BICUBIC,
                                     antialias=True)]
        head += [v2.RandomHorizontalFlip()] if hflip else []
    else:
        head = [v2.Resize(resize_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.CenterCrop(image_size)]
    return v2.Compose([v2.PILToTensor(), *head, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class _Items(Dataset):
    """``(image, target)`` items as the dicts the task modules read (``{"image", target_key, "path"}``)."""

    def __init__(self, dataset: Any, target_key: str = "target") -> None:
        self.dataset, self.target_key = dataset, target_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any] | Skipped:
        item = self.dataset[i]
        if isinstance(item, Skipped):  # unreadable and skipped (on_bad_image="skip")
            return item
        image, target = item
        return {"image": image, self.target_key: target, "path": self.dataset.path(i)}


class ImageFiles(Dataset):
    """Every image file under a folder (or one file), for ``predict``; targets are -1."""

    def __init__(self, root: str | Path, transform: Callable, on_bad_image: str = "error") -> None:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"'{root}' does not exist; give an image file or a folder of images")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under '{root}'")
        self.files, self.transform, self.on_bad_image = files, transform, on_bad_image

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> str:
        return str(self.files[i])

    def __getitem__(self, i: int) -> tuple[Any, int] | Skipped:
        image = open_image(str(self.files[i]), self.on_bad_image)
        return image if isinstance(image, Skipped) else (self.transform(image), -1)


class ClassificationData(ShardedDataModule):
    """Image-classification data from a local folder, loaded the way the release trains.

    Layouts (``format``, detected when ``auto``): an image folder (``train/<class>/*.jpg``),
    the release's ``meta/{train,val,test}.txt`` lists, and torchvision's Flowers102,
    Oxford-IIIT Pet and VOC 2007 folders (nothing is downloaded).

    Args:
        root: The data set's folder.
        format: ``auto``, ``imagefolder``, ``release``, ``flowers102``, ``pets`` or ``voc2007``.
        classes: Class names (a list or a text file, one per line), where the layout has none.
        multilabel: Multi-label targets and mAP (VOC 2007); otherwise single-label top-1.
        splits: ``(train, val, test)`` split names; the layout's defaults when left out.
        batch_size: Images per step and process.
        num_workers: Loader worker processes.
        image_size: Crop size.
        resize_size: Shorter side before the centre crop at test time.
        mean: Normalisation mean.
        std: Normalisation std.
        crop_scale: Area range of the training RandomResizedCrop.
        hflip: Random horizontal flips in training (off for digits and text).
        on_bad_image: ``error`` (stop, naming the file) or ``skip`` (drop it and count it).
        predict_path: Image file or folder for ``predict`` (default: the test split).
        seed: Seeds the shuffling and augmentation (with the epoch), for reproducible resumes.
    """

    def __init__(
        self,
        root: str,
        *,
        format: str = "auto",
        classes: list[str] | str | None = None,
        multilabel: bool = False,
        splits: tuple[str, str, str] | None = None,
        batch_size: int = 16,
        num_workers: int = 2,
        image_size: int = 224,
        resize_size: int = 256,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip: bool = True,
        on_bad_image: str = "error",
        predict_path: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}")
        if format != "auto" and format not in FORMATS:
            raise ValueError(f"unknown data format {format!r} (data.init_args.format); choose one of {', '.join(FORMATS)} or auto")
        if not Path(root).exists():
            raise FileNotFoundError(f"data folder '{root}' does not exist; set `data.root` to your data set's folder")
        self.format = detect_format(root) if format == "auto" else format
        self.image_size = image_size
        self.root, self.multilabel, self.on_bad_image = root, multilabel, on_bad_image
        self.splits = tuple(splits) if splits else DEFAULT_SPLITS[self.format]
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_transform = classification_transforms(True, image_size, resize_size, mean, std, crop_scale, hflip)
        self.eval_transform = classification_transforms(False, image_size, resize_size, mean, std)
        self.predict_path = predict_path
        # read the lists now so that a wrong folder or a bad label stops the run before it starts
        self.classes: list[str] | None = None
        self._given_classes = classes
        self.train_set = self._build(self.splits[0], self.train_transform, classes)
        self.classes = list(self.train_set.classes)
        self.val_set = self._build(self.splits[1], self.eval_transform)
        self._test_set: Dataset | None = self.val_set if self.splits[2] == self.splits[1] else None

    def _build(self, split: str, transform: Callable, classes: Any = None) -> Any:
        if classes is None:  # val/test: train's class list where a split's own listing could differ
            classes = self.classes if self.format in ("imagefolder", "pets") else self._given_classes
        return build_classification_dataset(
            self.root, split, format=self.format, classes=classes,
            multilabel=self.multilabel, transform=transform, on_bad_image=self.on_bad_image,
        )

    @property
    def test_set(self) -> Any:
        """The test split, read when first needed (a data set may have none to ``fit``)."""
        if self._test_set is None:
            self._test_set = self._build(self.splits[2], self.eval_transform)
        return self._test_set

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def items(self, dataset: Dataset) -> Dataset:
        return _Items(dataset)

    def predict_set(self) -> Dataset:
        if self.predict_path is None:
            return self.items(self.test_set)
        return self.items(ImageFiles(self.predict_path, self.eval_transform, self.on_bad_image))
