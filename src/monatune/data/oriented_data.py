"""The Lightning data module of oriented detection: DOTA-v1.0 (split patches) and STAR folders."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .images import _check_on_bad_image
from .loading import ShardedDataModule
from .oriented import (
    DOTA_CLASSES,
    IMAGE_SUFFIXES,
    STAR_CLASSES,
    OrientedDataset,
    collate_oriented,
    flip_probabilities,
    oriented_transforms,
    read_oriented,
)

__all__ = ["OrientedData"]

_DEFAULTS = {  # format -> (classes, splits, full_images)
    "dota": (DOTA_CLASSES, ("trainval", "trainval", "test"), False),
    "star": (STAR_CLASSES, ("train", "test", "test"), True),
}


class OrientedData(ShardedDataModule):
    """Oriented-detection data from DOTA-format folders, loaded the way the release trains H2RBox-v2+.

    ``root/<split>/`` holds ``images/`` and ``annfiles/`` (or DOTA's raw ``labelTxt/``); a split with
    ``images/`` only has no annotations (DOTA's test split): it can be tested (the task writes the
    evaluation server's files) but not scored.

    - ``format="dota"``: DOTA-v1.0's 15 classes; splits default to ``trainval, trainval, test``, the
      folders ``monatune split`` writes (the release trains on, and validates on, the train + val
      patches); evaluation is per patch.
    - ``format="star"``: STAR's 48 classes; splits ``train, test, test``; evaluation images are whole
      scenes that the task reads in sliding windows (``full_images``).

    Training images get the release's pipeline (:func:`~monatune.data.oriented.oriented_transforms`:
    long side to ``size``, a horizontal, vertical or diagonal flip with p 0.25 each, or a horizontal
    flip with p 0.5); with ``horizontal_boxes`` (H2RBox) their boxes are the circumscribed horizontal
    boxes of the rotated ones; without it the detectors train on the rotated boxes.

    Args:
        root: The data set's folder.
        format: ``dota`` or ``star``.
        splits: ``(train, val, test)`` folder names under ``root``.
        classes: Class names (default: the format's).
        horizontal_boxes: Train on circumscribed horizontal boxes (H2RBox-v2+: weak supervision).
        full_images: Evaluation images are whole scenes, read by the task in sliding windows (default:
            STAR yes, DOTA no).
        size: The training resize's long side.
        flip: The random flip in training: ``three-way`` (or true: horizontal, vertical, diagonal,
            p 0.25 each, as the release's STAR configs), ``horizontal`` (p 0.5, as its data-set bases
            and the horizontal-anchor RetinaNet), or ``none`` (or false).
        filter_empty_gt: Train only on images with at least one object (mmrotate's default);
            ``train_filtered`` counts those left out.
        batch_size: Images per step and process.
        num_workers: Loader worker processes.
        on_bad_annotation: ``drop`` (default) or ``error``.
        on_bad_image: ``error`` or ``skip``.
        predict_path: Image file or folder for ``predict`` (default: the test split).
        seed: Seeds the shuffling and augmentation.
    """

    def __init__(
        self,
        root: str,
        *,
        format: str = "dota",
        splits: tuple[str, str, str] | None = None,
        classes: list[str] | None = None,
        horizontal_boxes: bool = True,
        full_images: bool | None = None,
        size: int = 1024,
        flip: bool | str = True,
        filter_empty_gt: bool = True,
        batch_size: int = 2,
        num_workers: int = 2,
        on_bad_annotation: str = "drop",
        on_bad_image: str = "error",
        predict_path: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if format not in _DEFAULTS:
            raise ValueError(f"unknown oriented-detection format {format!r}; choose from {tuple(_DEFAULTS)}")
        if batch_size < 1 or size < 32:
            raise ValueError(f"`batch_size` must be at least 1 and `size` at least 32, got {batch_size} and {size}")
        _check_on_bad_image(on_bad_image)
        flip_probabilities(flip)  # an unknown setting stops here, before any file is read
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder '{root}' does not exist; set `data.root` to your data set's folder")
        default_classes, default_splits, default_full = _DEFAULTS[format]
        self.format = format
        self.splits = tuple(splits) if splits else default_splits
        if len(self.splits) != 3:
            raise ValueError(f"`splits` takes three folder names (train, val, test), got {list(self.splits)}")
        self._classes = list(classes) if classes else list(default_classes)
        if len(set(self._classes)) != len(self._classes):
            raise ValueError(f"`classes` repeats a name: {self._classes}")
        self.full_images = default_full if full_images is None else bool(full_images)
        self.horizontal_boxes, self.size, self.flip = horizontal_boxes, size, flip
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.on_bad_annotation, self.on_bad_image, self.predict_path = on_bad_annotation, on_bad_image, predict_path
        # read the annotations now: a wrong folder or a malformed file stops the run before it starts
        self.train_set = self._read(0, train=True)
        if not self.train_set.has_annotations:
            raise FileNotFoundError(f"training split '{self.root / self.splits[0]}' has no annfiles/ or labelTxt/ folder")
        self.filter_empty_gt, self.train_filtered = filter_empty_gt, 0
        if filter_empty_gt:
            self.train_set, self.train_filtered = self.train_set.training_subset()
        if len(self.train_set) == 0:
            raise ValueError(f"training split {self.splits[0]!r} has no image with an object to train on; check its "
                             "annotations (and `format`/`classes`), or set filter_empty_gt: false")  # fmt: skip
        self.val_set = self._read(1)
        self._test_set: OrientedDataset | None = self.val_set if self.splits[2] == self.splits[1] else None

    def _read(self, k: int, *, train: bool = False) -> OrientedDataset:
        return read_oriented(
            self.root / self.splits[k], classes=self._classes, on_bad_annotation=self.on_bad_annotation,
            on_bad_image=self.on_bad_image, transforms=oriented_transforms(train, size=self.size, flip=self.flip),
            horizontal_boxes=self.horizontal_boxes and train, pixels=train or not self.full_images,
        )  # fmt: skip

    @property
    def test_set(self) -> OrientedDataset:
        """The test split, read when first needed."""
        if self._test_set is None:
            self._test_set = self._read(2)
        return self._test_set

    @property
    def has_val_annotations(self) -> bool:
        return self.val_set.has_annotations

    @property
    def has_test_annotations(self) -> bool:
        return self.test_set.has_annotations

    @property
    def classes(self) -> list[str]:
        """Class names; label ``k`` is ``classes[k - 1]``."""
        return list(self._classes)

    @property
    def num_classes(self) -> int:
        return len(self._classes)

    collate = staticmethod(collate_oriented)

    def predict_set(self) -> Dataset:
        if self.predict_path is None:
            return self.test_set
        path = Path(self.predict_path).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            raise FileNotFoundError(f"predict_path '{path}' does not exist")
        if not files:
            raise FileNotFoundError(f"no image ({', '.join(IMAGE_SUFFIXES)}) in '{path}'")
        empty: Any = [[]] * len(files)
        # pictures are read by the task (whole, or in windows when larger than one), never decoded here
        return OrientedDataset(files, [e for e in empty], empty, empty, self._classes, has_annotations=False,
                               transforms=oriented_transforms(False), on_bad_image=self.on_bad_image, pixels=False)  # fmt: skip
