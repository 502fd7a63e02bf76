"""The Lightning data module of semantic segmentation: ADE20K and images + index-PNG masks folders."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from .images import Skipped, _check_on_bad_image, open_image
from .classification_data import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, _Items
from .loading import ShardedDataModule
from .segmentation import (
    IGNORE_INDEX,
    SegmentationDataset,
    collate_segmentation,
    read_ade20k,
    read_masks,
    segmentation_transforms,
)

__all__ = ["SegmentationData", "SEGMENTATION_FORMATS"]

SEGMENTATION_FORMATS = ("ade20k", "masks")
_DEFAULT_SPLITS = {"ade20k": ("training", "validation", "validation"), "masks": ("train", "val", "val")}


class _Unlabelled(Dataset):
    """Images without masks (``predict``): the mask is all ignored, at the image's original size."""

    def __init__(self, files: ImageFiles, transform: Any) -> None:
        self.paths, self.on_bad_image, self.transform = [str(f) for f in files.files], files.on_bad_image, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any] | Skipped:
        pil = open_image(self.paths[i], self.on_bad_image)
        if isinstance(pil, Skipped):
            return pil
        image = tv_tensors.Image(F.pil_to_tensor(pil))
        mask = tv_tensors.Mask(torch.full(image.shape[-2:], IGNORE_INDEX, dtype=torch.int64))
        image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, "path": self.paths[i]}


class SegmentationData(ShardedDataModule):
    """Semantic-segmentation data from a local folder, loaded the way the release trains on ADE20K.

    ``format="ade20k"``: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` with
    ``annotations/.../*.png``; label 0 ("other") is ignored and 1..150 become classes 0..149, as
    the standard protocol does. ``format="masks"``: ``root/images/<split>/*`` with
    ``root/masks/<split>/<name>.png`` index masks (255: ignored) and a class list.

    Training items are ``crop_size`` crops (:func:`~monatune.data.segmentation.segmentation_transforms`:
    random rescale at ``ratio_range`` of ``scale``, a crop at most ``cat_max_ratio`` one class, flip,
    photometric distortion, normalisation, padding with 255 in the mask). Evaluation images are
    resized to fit ``scale`` and their masks keep the original size; the task scores at that size.

    Args:
        root: The data set's folder.
        format: ``ade20k`` or ``masks``.
        classes: Class names (a list or a text file, one per line); ``masks`` needs them.
        splits: ``(train, val, test)`` split folder names (ADE20K: ``training, validation, validation``).
        reduce_zero_label: ``masks`` format: label 0 is ignored and the others shift down by one.
        batch_size: Images per step and process (at least 2 to train: BatchNorm); an epoch's incomplete
            last training batch is left out.
        num_workers: Loader worker processes.
        crop_size: Training crop ``(height, width)``.
        scale: ``(long, short)`` sides images are fitted into (2048, 512).
        ratio_range: Training rescale ratios of ``scale``.
        cat_max_ratio: The largest share one class may take of a training crop (1: no check).
        hflip: Random horizontal flips in training.
        photometric: mmsegmentation's photometric distortion in training.
        mean: Normalisation mean.
        std: Normalisation std.
        on_bad_image: ``error`` (stop, naming the file) or ``skip`` (drop it and count it).
        check_masks: Read every mask before training, to report all bad masks at once
            (size, labels); otherwise each mask is checked when its item is read.
        predict_path: Image file or folder for ``predict`` (default: the test split).
        seed: Seeds the shuffling and augmentation (with the epoch), for reproducible resumes.
    """

    collate = staticmethod(collate_segmentation)
    # the UperNet head's BatchNorm cannot train on a batch of one image, which an incomplete last batch
    # can be; the release's mmseg infinite sampler gives only full batches too
    drop_last_train = True

    def __init__(
        self,
        root: str,
        *,
        format: str = "ade20k",
        classes: list[str] | str | None = None,
        splits: tuple[str, str, str] | None = None,
        reduce_zero_label: bool = False,
        batch_size: int = 2,
        num_workers: int = 2,
        crop_size: tuple[int, int] = (512, 512),
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: bool = True,
        photometric: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        on_bad_image: str = "error",
        check_masks: bool = False,
        predict_path: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if format not in SEGMENTATION_FORMATS:
            raise ValueError(f"unknown segmentation format {format!r}; choose from {SEGMENTATION_FORMATS}")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}")
        if format == "masks" and classes is None:
            raise ValueError("format 'masks' needs `classes`: a list of names or a text file with one per line")
        _check_on_bad_image(on_bad_image)
        if not Path(root).expanduser().exists():
            raise FileNotFoundError(f"data folder '{root}' does not exist; set `data.root` to your data set's folder")
        self.root, self.format, self.given_classes = Path(root).expanduser(), format, classes
        self.splits = tuple(splits) if splits else _DEFAULT_SPLITS[format]
        if len(self.splits) != 3:
            raise ValueError(f"`splits` takes three names (train, val, test), got {list(self.splits)}")
        self.reduce_zero_label, self.on_bad_image, self.check_masks = reduce_zero_label, on_bad_image, check_masks
        self.batch_size, self.num_workers, self.seed, self.predict_path = batch_size, num_workers, seed, predict_path
        self.crop_size = tuple(crop_size)
        options = dict(scale=tuple(scale), mean=mean, std=std)
        self.train_transform = segmentation_transforms(
            True, crop_size=self.crop_size, ratio_range=tuple(ratio_range), cat_max_ratio=cat_max_ratio,
            hflip=hflip, photometric=photometric, **options,
        )  # fmt: skip
        self.eval_transform = segmentation_transforms(False, **options)
        # read the listings now so that a wrong folder stops the run before it starts
        self.train_set = self._read(0, self.train_transform)
        self.val_set = self._read(1, self.eval_transform)
        self._test_set: SegmentationDataset | None = self.val_set if self.splits[2] == self.splits[1] else None

    def _read(self, k: int, transform: Any) -> SegmentationDataset:
        common = dict(transforms=transform, on_bad_image=self.on_bad_image)
        if self.format == "ade20k":
            dataset = read_ade20k(self.root, self.splits[k], **common)
            if self.given_classes is not None:
                dataset.classes = _class_list(self.given_classes)
        else:
            dataset = read_masks(self.root, self.splits[k], classes=self.given_classes,
                                 reduce_zero_label=self.reduce_zero_label, **common)  # fmt: skip
        if self.check_masks:
            dataset.check_all()
        return dataset

    @property
    def test_set(self) -> SegmentationDataset:
        """The test split, read when first needed (a data set may have none to ``fit``)."""
        if self._test_set is None:
            self._test_set = self._read(2, self.eval_transform)
        return self._test_set

    @property
    def classes(self) -> list[str]:
        return list(self.train_set.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def items(self, dataset: Dataset) -> Dataset:
        return _Items(dataset, target_key="mask")

    def predict_set(self) -> Dataset:
        if self.predict_path is None:
            return self.items(self.test_set)
        return _Unlabelled(ImageFiles(self.predict_path, self.eval_transform, self.on_bad_image), self.eval_transform)


def _class_list(classes: list[str] | str) -> list[str]:
    if isinstance(classes, str):
        return [line.strip() for line in Path(classes).read_text().splitlines() if line.strip()]
    return list(classes)
