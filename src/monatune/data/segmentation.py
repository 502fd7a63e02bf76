"""Semantic-segmentation data sets (ADE20K, image/mask folders) and the release's mmsegmentation transforms.

:func:`read_ade20k` reads ``ADEChallengeData2016``; :func:`read_masks` reads any folder of images with
one label PNG each. Both give a :class:`SegmentationDataset` whose items are
``(tv_tensors.Image uint8 [3, H, W], tv_tensors.Mask int64 [H, W])``, pixel labels ``0..K-1`` and
255 for "ignore". Files are paired by name when the data set is built; images and masks are read
lazily, and a mask is checked (size, labels) each time it is read, or all at once by
:meth:`SegmentationDataset.check_all`.

:func:`segmentation_transforms` is mmsegmentation's ADE20K pipeline (the release's UperNet configs) as
``torchvision.transforms.v2``. torchvision has what it can (the flip, dtype conversion, the resize and
crop kernels); mmsegmentation's keep-ratio resize into a rectangle, crop with ``cat_max_ratio``, pad to
the crop size and ``PhotoMetricDistortion`` have no torchvision equivalent (``RandomPhotometricDistort``
scales brightness, blends contrast with the mean and shifts hue by at most 18°), so they are the small
``v2.Transform`` subclasses below. mmcv and mmsegmentation themselves were not taken as dependencies.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .classification_data import IMAGENET_MEAN, IMAGENET_STD
from .classification import BadAnnotationError, _class_names
from .images import _IMAGE_ERRORS, _SKIP_HINT, BadImageError, Skipped, _check_on_bad_image, open_image

__all__ = [
    "ADE20K_CLASSES",
    "IGNORE_INDEX",
    "SegmentationDataset",
    "read_ade20k",
    "read_masks",
    "reduce_zero_label",
    "segmentation_transforms",
    "collate_segmentation",
    "fit_size",
    "ResizeToFit",
    "SegRandomCrop",
    "PhotoMetricDistortion",
    "PadTo",
]

IGNORE_INDEX = 255
MASK_MODES = ("L", "P", "I;16", "I")  # one class index per pixel; "P" is read as palette indices, not colours
_LIST = 5  # how many files an error names

# mmsegmentation's ADE20KDataset.METAINFO["classes"], in label order (mmseg spells the 8th 'bed ', with a space)
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill",
    "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal",
    "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase",
    "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board",
    "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
_ADE_SPLITS = {"training": "training", "train": "training", "validation": "validation", "val": "validation"}


class SegmentationDataset(Dataset):
    """Images with per-pixel labels; ``dataset[i]`` is ``transforms(image, mask)``.

    ``image`` is a ``tv_tensors.Image`` uint8 ``[3, H, W]``; ``mask`` a ``tv_tensors.Mask`` int64
    ``[H, W]`` of labels ``0..len(classes)-1``, or ``ignore_index`` (255) for pixels that count in no
    loss or metric. Masks are single-channel PNGs (modes ``MASK_MODES``; a palette PNG's indices are
    the labels, its colours are not looked at).

    Each read checks the mask: it must decode, have its image's size, and hold only labels below
    ``len(classes)`` or 255 (after ``reduce_zero_label``); otherwise :class:`BadAnnotationError` names
    the files. A missing or undecodable image raises :class:`BadImageError` (``on_bad_image="error"``)
    or gives a :class:`~monatune.data.images.Skipped` marker (``"skip"``), counted in ``skipped`` (this
    process only). To find every problem
    before a long run, call :meth:`check_all`.

    Args:
        images: image file of each item.
        masks: label PNG of each item, same order.
        classes: class names, index = label (at most 255: 255 is the ignore label).
        reduce_zero_label: label 0 becomes 255 and every other label ``l`` becomes ``l - 1``
            (:func:`reduce_zero_label`; ADE20K's 0 is "other").
        transforms: called as ``transforms(image, mask)``, e.g. :func:`segmentation_transforms`.
        on_bad_image: ``"error"`` or ``"skip"``.
    """

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        images: Sequence[str | Path],
        masks: Sequence[str | Path],
        classes: Sequence[str],
        *,
        reduce_zero_label: bool = False,
        transforms: Callable | None = None,
        on_bad_image: str = "error",
    ) -> None:
        _check_on_bad_image(on_bad_image)
        if len(images) != len(masks):
            raise ValueError(f"got {len(images)} images but {len(masks)} masks; they must be as many")
        if not 0 < len(classes) <= IGNORE_INDEX:
            raise ValueError(f"need 1 to {IGNORE_INDEX} class names ({IGNORE_INDEX} is the ignore label), "
                             f"got {len(classes)}")  # fmt: skip
        self._images = [str(p) for p in images]
        self._masks = [str(p) for p in masks]
        self.classes = [str(c) for c in classes]
        self.reduce_zero_label = reduce_zero_label
        self.transforms = transforms
        self.on_bad_image = on_bad_image
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._images)

    def path(self, i: int) -> str:
        """Image file of item ``i``."""
        return self._images[i]

    def mask_path(self, i: int) -> str:
        """Label PNG of item ``i``."""
        return self._masks[i]

    def __getitem__(self, i: int) -> tuple[Any, Any] | Skipped:
        pil = open_image(self._images[i], self.on_bad_image)
        if isinstance(pil, Skipped):
            self.skipped += 1
            return pil
        image = tv_tensors.Image(F.pil_to_tensor(pil))
        mask = tv_tensors.Mask(torch.from_numpy(self.read_mask(i, pil.size)))
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask

    def read_mask(self, i: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """The checked int64 ``[H, W]`` labels of item ``i`` (``reduce_zero_label`` applied).

        Args:
            i: item index.
            image_size: the image's ``(width, height)``, which the mask must have.
        """
        path = self._masks[i]
        labels = _read_label_png(path)
        h, w = labels.shape
        if image_size is not None and (w, h) != tuple(image_size):
            raise BadAnnotationError(f"mask '{path}' is {w}x{h} but its image '{self._images[i]}' is "
                                     f"{image_size[0]}x{image_size[1]}; a mask must have its image's size (are "
                                     "they paired by the right name?)")  # fmt: skip
        labels = labels.astype(np.int64)
        if self.reduce_zero_label:
            labels = reduce_zero_label(labels)
        k = len(self.classes)
        bad = ((labels >= k) | (labels < 0)) & (labels != IGNORE_INDEX)
        if bad.any():
            values = np.unique(labels[bad]).tolist()
            shown = ", ".join(map(str, values[:10])) + (", ..." if len(values) > 10 else "")
            reduced = " (after reduce_zero_label: the file's values minus 1)" if self.reduce_zero_label else ""
            raise BadAnnotationError(f"mask '{path}' has label(s) {shown}{reduced} but there are {k} classes "
                                     f"(labels 0..{k - 1}, {IGNORE_INDEX} = ignore); pass classes= with a name "
                                     f"for every label, or set those pixels to {IGNORE_INDEX}")  # fmt: skip
        return labels

    def check_all(self, *, workers: int = 8, raise_errors: bool = True) -> list[str]:
        """Read every mask (and every image's size from its header) and list what ``dataset[i]`` would raise.

        Images are not decoded (a truncated image is found when it is read), and with
        ``on_bad_image="skip"`` an unreadable image is no problem (its item will be skipped, mask unread).
        ADE20K's 20,210 training masks take about a minute with 8 threads.

        Args:
            workers: threads reading files (0: in this thread).
            raise_errors: raise one error summarising the problems (the type of the first) instead of
                returning them.

        Returns:
            One message per bad item, in item order; empty when every item reads.
        """
        def check(i: int) -> Exception | None:
            try:
                with Image.open(self._images[i]) as im:
                    size = im.size
            except _IMAGE_ERRORS as e:
                if self.on_bad_image == "skip":
                    return None
                return BadImageError(f"cannot read image '{self._images[i]}' ({type(e).__name__}: {e}); fix or remove "
                                     f"it, {_SKIP_HINT}")  # fmt: skip
            try:
                self.read_mask(i, size)
            except BadAnnotationError as e:
                return e
            return None

        if workers > 0:
            with ThreadPoolExecutor(workers) as pool:  # PIL decodes without the GIL
                found = list(pool.map(check, range(len(self))))
        else:
            found = [check(i) for i in range(len(self))]
        errors = [e for e in found if e is not None]
        if errors and raise_errors:
            more = f"\n  ... and {len(errors) - _LIST} more" if len(errors) > _LIST else ""
            lines = "\n  ".join(str(e) for e in errors[:_LIST])
            raise type(errors[0])(f"{len(errors)} of {len(self)} items cannot be read:\n  {lines}{more}")
        return [str(e) for e in errors]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, {len(self.classes)} classes, "
                f"reduce_zero_label={self.reduce_zero_label})")  # fmt: skip


def reduce_zero_label(labels: np.ndarray) -> np.ndarray:
    """mmsegmentation's ``LoadAnnotations(reduce_zero_label=True)``: 0 -> 255, ``l`` -> ``l - 1``, 255 stays 255."""
    labels = labels.astype(np.int64)  # a copy
    zero = labels == 0
    labels -= 1
    labels[zero | (labels == IGNORE_INDEX - 1)] = IGNORE_INDEX  # mmseg: gt[gt == 0] = 255; gt -= 1; gt[gt == 254] = 255
    return labels


def _read_label_png(path: str) -> np.ndarray:
    """The ``[H, W]`` integer array of a single-channel label image; BadAnnotationError names the file."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            labels = np.asarray(im) if mode in MASK_MODES else None  # asarray decodes the whole file
    except _IMAGE_ERRORS as e:
        raise BadAnnotationError(f"cannot read mask '{path}' ({type(e).__name__}: {e}); fix or re-export "
                                 "it") from e  # fmt: skip
    if labels is None:
        raise BadAnnotationError(f"mask '{path}' is a mode-{mode} image; masks must hold one class index per pixel "
                                 f"(PNG mode {', '.join(MASK_MODES)}); convert colour-coded masks to index "
                                 "images first")  # fmt: skip
    return labels


# --- readers -------------------------------------------------------------------------------------


def read_ade20k(
    root: str | Path,
    split: str,
    *,
    transforms: Callable | None = None,
    on_bad_image: str = "error",
) -> SegmentationDataset:
    """Read ADE20K (the SceneParsing ``ADEChallengeData2016`` release) as mmsegmentation does.

    Images ``images/<split>/*.jpg`` are paired with ``annotations/<split>/<same name>.png``. Labels
    are reduced (``reduce_zero_label=True``): the file's 0 ("other") is ignored (255) and 1..150
    become 0..149, named by ``ADE20K_CLASSES``.

    Args:
        root: the folder holding ``ADEChallengeData2016/``, or that folder itself.
        split: ``"training"`` or ``"validation"`` (also ``"train"``, ``"val"``).
        transforms: called as ``transforms(image, mask)``, e.g. :func:`segmentation_transforms`.
        on_bad_image: ``"error"`` or ``"skip"`` (see :class:`SegmentationDataset`).

    Example:
        >>> train = read_ade20k("data", "training", transforms=segmentation_transforms(True))
        >>> image, mask = train[0]  # float [3, 512, 512], int64 [512, 512]
    """
    _check_on_bad_image(on_bad_image)
    if split not in _ADE_SPLITS:
        raise ValueError(f"unknown ADE20K split {split!r}; use 'training' or 'validation' (or 'train', 'val')")
    root = Path(root).expanduser()
    base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    folder = _ADE_SPLITS[split]
    layout = "ADEChallengeData2016/images/{training,validation}/*.jpg and .../annotations/{training,validation}/*.png"
    images, masks = _pair_files(base / "images" / folder, base / "annotations" / folder, (".jpg",), layout)
    return SegmentationDataset(images, masks, ADE20K_CLASSES, reduce_zero_label=True, transforms=transforms,
                               on_bad_image=on_bad_image)  # fmt: skip


def read_masks(
    root: str | Path,
    split: str,
    *,
    classes: Sequence[str] | str | Path,
    images: str = "images",
    masks: str = "masks",
    reduce_zero_label: bool = False,
    transforms: Callable | None = None,
    on_bad_image: str = "error",
) -> SegmentationDataset:
    """Read a folder of images with one label PNG each: ``root/<images>/<split>/<name>.<jpg, png, ...>``
    and ``root/<masks>/<split>/<name>.png`` (one folder level, paired by name).

    Args:
        root: the data set folder.
        split: the sub-folder of ``images`` and ``masks`` to read (``"train"``, ``"val"``, ...).
        classes: class names (index = label), or a text file with one name per line.
        images: the image folder's name under ``root``.
        masks: the mask folder's name under ``root``.
        reduce_zero_label: the masks' 0 means "unlabelled": it becomes 255 and labels shift down by one.
        transforms: called as ``transforms(image, mask)``.
        on_bad_image: ``"error"`` or ``"skip"`` (see :class:`SegmentationDataset`).

    Example:
        >>> ds = read_masks("data/roads", "val", classes="data/roads/classes.txt",
        ...                 transforms=segmentation_transforms(False))
    """
    _check_on_bad_image(on_bad_image)
    names = _class_names(classes)
    if names is None:
        raise ValueError("classes must be a list of class names or a text file with one name per line, got None")
    root = Path(root).expanduser()
    layout = f"{images}/<split>/<name>.jpg (or .png, ...) and {masks}/<split>/<name>.png under '{root}'"
    image_files, mask_files = _pair_files(root / images / split, root / masks / split, IMG_EXTENSIONS, layout)
    return SegmentationDataset(image_files, mask_files, names, reduce_zero_label=reduce_zero_label,
                               transforms=transforms, on_bad_image=on_bad_image)  # fmt: skip


def _files(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """``{stem: path}`` of the visible files of ``folder`` with one of ``suffixes``; a stem twice is an error."""
    found: dict[str, Path] = {}
    for entry in os.scandir(folder):
        name = entry.name
        if name.startswith(".") or not name.lower().endswith(tuple(suffixes)) or not entry.is_file():
            continue
        stem = os.path.splitext(name)[0]
        if stem in found:
            raise BadAnnotationError(f"'{folder}' has both '{found[stem].name}' and '{name}'; keep one file per name")
        found[stem] = Path(entry.path)
    return found


def _pair_files(
    image_dir: Path, mask_dir: Path, image_suffixes: Sequence[str], layout: str
) -> tuple[list[Path], list[Path]]:
    """Images and their masks, sorted by name; every image needs a mask and every mask an image."""
    for folder, what in ((image_dir, "image"), (mask_dir, "mask")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder '{folder}' does not exist; expected {layout}")
    images, masks = _files(image_dir, image_suffixes), _files(mask_dir, (".png",))
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(image_suffixes)}) in '{image_dir}'; expected {layout}")
    no_mask = sorted(images.keys() - masks.keys())
    no_image = sorted(masks.keys() - images.keys())
    if no_mask or no_image:
        problems = []
        if no_mask:
            first = ", ".join(images[s].name for s in no_mask[:_LIST])
            problems.append(f"{len(no_mask)} of {len(images)} images have no <name>.png in '{mask_dir}' ({first}"
                            f"{', ...' if len(no_mask) > _LIST else ''})")  # fmt: skip
        if no_image:
            first = ", ".join(masks[s].name for s in no_image[:_LIST])
            problems.append(f"{len(no_image)} of {len(masks)} masks have no image in '{image_dir}' ({first}"
                            f"{', ...' if len(no_image) > _LIST else ''})")  # fmt: skip
        raise BadAnnotationError(f"{'; '.join(problems)}; every image needs a mask of the same name (move the "
                                 "unpaired files away)")  # fmt: skip
    stems = sorted(images)
    return [images[s] for s in stems], [masks[s] for s in stems]


# --- transforms ----------------------------------------------------------------------------------


def fit_size(height: int, width: int, scale: tuple[int, int], ratio: float = 1.0) -> tuple[int, int]:
    """``(height, width)`` after mmcv's keep-ratio rescale into ``scale`` x ``ratio``: the largest size
    whose long side is at most ``max(scale) * ratio`` and short side at most ``min(scale) * ratio``."""
    long_edge, short_edge = int(max(scale) * ratio), int(min(scale) * ratio)  # mmcv's RandomResize truncates
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


class ResizeToFit(v2.Transform):
    """mmcv's ``RandomResize(scale, ratio_range, keep_ratio=True)`` (``Resize(scale, keep_ratio=True)``
    without ``ratio_range``): draw ``r`` uniformly from ``ratio_range``, resize keeping the aspect
    ratio to fit :func:`fit_size` ``(scale, r)``. Images are bilinear without antialiasing (as cv2's),
    masks nearest; ``resize_masks=False`` leaves masks as they are (mmseg's evaluation)."""

    def __init__(
        self, scale: tuple[int, int], ratio_range: tuple[float, float] | None = None, *, resize_masks: bool = True
    ) -> None:
        super().__init__()
        if len(scale) != 2 or min(scale) <= 0:
            raise ValueError(f"scale must be two positive sizes (long, short), got {scale}")
        if ratio_range is not None and not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
        self.scale, self.ratio_range, self.resize_masks = tuple(scale), ratio_range, resize_masks

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        ratio = 1.0
        if self.ratio_range is not None:
            low, high = self.ratio_range
            ratio = low + float(torch.rand(())) * (high - low)
        return {"size": list(fit_size(h, w, self.scale, ratio))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask) and not self.resize_masks:
            return inpt
        # masks: torchvision's mask kernel resizes nearest whatever the interpolation
        return self._call_kernel(F.resize, inpt, size=params["size"], interpolation=v2.InterpolationMode.BILINEAR,
                                 antialias=False)  # fmt: skip


class SegRandomCrop(v2.Transform):
    """mmsegmentation's ``RandomCrop(crop_size, cat_max_ratio)``: a random ``crop_size`` (h, w) window,
    the whole extent on a side shorter than the crop. With ``cat_max_ratio < 1`` a window is redrawn
    (up to 10 times, the last draw kept) while one class covers ``cat_max_ratio`` or more of its
    labelled pixels, or it holds fewer than two classes (255 is not counted)."""

    def __init__(self, crop_size: int | tuple[int, int], cat_max_ratio: float = 1.0,
                 ignore_index: int = IGNORE_INDEX) -> None:  # fmt: skip
        super().__init__()
        self.crop_size = _hw(crop_size, "crop_size")
        self.cat_max_ratio, self.ignore_index = float(cat_max_ratio), ignore_index

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        ch, cw = min(self.crop_size[0], h), min(self.crop_size[1], w)

        def draw() -> dict[str, int]:
            top, left = int(torch.randint(0, h - ch + 1, ())), int(torch.randint(0, w - cw + 1, ()))
            return {"top": top, "left": left, "height": ch, "width": cw}

        params = draw()
        masks = [x for x in flat_inputs if isinstance(x, tv_tensors.Mask)]
        if self.cat_max_ratio < 1.0 and masks:
            for _ in range(10):
                window = masks[0][..., params["top"]:params["top"] + ch, params["left"]:params["left"] + cw]
                labels, counts = torch.unique(window, return_counts=True)
                counts = counts[labels != self.ignore_index]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                params = draw()
        return params

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class PhotoMetricDistortion(v2.Transform):
    """mmsegmentation's ``PhotoMetricDistortion``, each step with probability 0.5: add a brightness
    delta from ``U(-32, 32)``; multiply by a contrast factor from ``U(0.5, 1.5)`` (no blending with
    the mean); scale HSV saturation by ``U(0.5, 1.5)``; rotate hue by ``2 * randint(-18, 18)`` degrees
    (OpenCV's half-degree units, the upper end excluded as numpy's); contrast goes before saturation
    or after hue at random. Values are clipped and truncated to uint8 after each step, as mmseg does.

    Differences: saturation is scaled exactly in RGB (``c -> max - (max - c) * k``, the same as scaling
    S with V fixed) and hue rotated by torchvision's ``adjust_hue``, rather than through OpenCV's 8-bit
    HSV, which quantises hue to 2° steps. Only images change (uint8, or float in [0, 1] scaled alike).
    """

    _transformed_types = (tv_tensors.Image, F.is_pure_tensor)

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ) -> None:
        super().__init__()
        self.brightness_delta, self.hue_delta = float(brightness_delta), int(hue_delta)
        self.contrast_range, self.saturation_range = tuple(contrast_range), tuple(saturation_range)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        def coin() -> bool:
            return bool(torch.rand(()) < 0.5)

        def uniform(low: float, high: float) -> float:
            return low + float(torch.rand(())) * (high - low)

        d = self.brightness_delta
        return {
            "brightness": uniform(-d, d) if coin() else None,
            "contrast": uniform(*self.contrast_range) if coin() else None,
            "contrast_first": coin(),
            "saturation": uniform(*self.saturation_range) if coin() else None,
            "hue": int(torch.randint(-self.hue_delta, self.hue_delta, ())) / 180 if self.hue_delta and coin() else None,
        }  # fmt: skip

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        x = inpt.as_subclass(Tensor)
        top = 255.0 if x.dtype == torch.uint8 else 1.0
        if params["brightness"] is not None:
            x = _clip_like(x.float() + params["brightness"] * top / 255, x.dtype)
        if params["contrast_first"] and params["contrast"] is not None:
            x = _clip_like(x.float() * params["contrast"], x.dtype)
        if params["saturation"] is not None:
            x = _scale_saturation(x, params["saturation"])
        if params["hue"] is not None:
            x = F.adjust_hue(x, params["hue"])
        if not params["contrast_first"] and params["contrast"] is not None:
            x = _clip_like(x.float() * params["contrast"], x.dtype)
        return tv_tensors.wrap(x, like=inpt) if isinstance(inpt, tv_tensors.Image) else x


def _clip_like(x: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype == torch.uint8:
        return x.clamp_(0, 255).to(torch.uint8)  # truncates, as numpy's astype(np.uint8)
    return x.clamp_(0, 1).to(dtype)


def _scale_saturation(image: Tensor, factor: float) -> Tensor:
    """HSV saturation times ``factor`` (clipped at 1) with hue and value kept, computed in RGB."""
    x = image.float()
    top, bottom = x.amax(-3, keepdim=True), x.amin(-3, keepdim=True)  # V and V * (1 - S)
    k = torch.full_like(top, factor)
    if factor > 1:  # S * k <= 1: the smallest channel stays >= 0
        k = torch.minimum(k, top / (top - bottom).clamp_min(1e-6))
    return _clip_like(top - (top - x) * k, image.dtype)


class PadTo(v2.Transform):
    """Pad at the bottom and right to at least ``size`` (h, w): images with ``fill``, masks with ``mask_fill``."""

    def __init__(self, size: int | tuple[int, int], fill: float | Sequence[float] = 0.0,
                 mask_fill: int = IGNORE_INDEX) -> None:  # fmt: skip
        super().__init__()
        self.size = _hw(size, "size")
        self.fill = list(fill) if isinstance(fill, Sequence) else float(fill)
        self.mask_fill = mask_fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(self.size[1] - w, 0), max(self.size[0] - h, 0)]}  # left, top, right, bottom

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.fill
        return self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill)


def _hw(size: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"{name} must be a positive int or (height, width), got {size!r}")
    return pair  # type: ignore[return-value]


def segmentation_transforms(
    train: bool,
    *,
    crop_size: int | tuple[int, int] = (512, 512),
    scale: tuple[int, int] = (2048, 512),
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    hflip: bool = True,
    photometric: bool = True,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    image_fill: float | Sequence[float] = 0.0,
) -> Callable:
    """The release's ADE20K pipelines (mmsegmentation's UperNet configs) as ``torchvision.transforms.v2``.

    Training: :class:`ResizeToFit` ``(scale, ratio_range)`` (image bilinear, mask nearest), then
    :class:`SegRandomCrop` ``(crop_size, cat_max_ratio)``, a horizontal flip with probability 0.5,
    :class:`PhotoMetricDistortion`, the image to float32 in [0, 1] and normalised by ``mean`` /
    ``std``, and :class:`PadTo` ``crop_size`` (image ``image_fill``, mask 255), so every item is
    ``crop_size``; as in mmseg, the padding comes after the normalisation, so 0 is the mean colour.

    Evaluation: the image alone is resized to fit ``scale`` (2048 x 512) keeping its ratio and made
    float32 and normalised; the mask keeps the original size, as mmseg scores at the original
    resolution. The task resizes its logits to the mask's size before the metrics.

    Args:
        train: the training pipeline (random) rather than the evaluation one.
        crop_size: training crop (height, width).
        scale: (long, short) sides to fit the image into before the ratio.
        ratio_range: training scale ratios, drawn uniformly.
        cat_max_ratio: the largest share of a crop one class may take (1: no check).
        hflip: random horizontal flips in training.
        photometric: mmseg's photometric distortion in training.
        mean: normalisation mean (ImageNet's, as the release); ``None``: images stay in [0, 1].
        std: normalisation std.
        image_fill: the padded image's value after normalisation (one per channel or one for all).

    Example:
        >>> train = read_ade20k("data", "training", transforms=segmentation_transforms(True))
    """
    normalise = [v2.Normalize(list(mean), list(std))] if mean is not None else []
    if not train:
        return v2.Compose([ResizeToFit(scale, resize_masks=False), v2.ToDtype(torch.float32, scale=True), *normalise])
    steps: list[Any] = [ResizeToFit(scale, ratio_range), SegRandomCrop(crop_size, cat_max_ratio)]
    steps += [v2.RandomHorizontalFlip(0.5)] if hflip else []
    steps += [PhotoMetricDistortion()] if photometric else []
    # ToDtype given one dtype converts images only: masks stay int64
    steps += [v2.ToDtype(torch.float32, scale=True), *normalise, PadTo(crop_size, fill=image_fill)]
    return v2.Compose(steps)


def collate_segmentation(items: Sequence[Any]) -> dict[str, Any]:
    """Batch segmentation items, dropping :class:`~monatune.data.images.Skipped` markers (skipped images).

    Items are ``(image, mask)``, ``(image, mask, path)`` or ``{"image", "mask", "path"}`` dicts.
    Images are stacked into one tensor when they all have the same size (training crops), else
    left as a list (evaluation images); masks likewise.

    Returns:
        ``{"images": Tensor [B, 3, H, W] or [Tensor], "masks": Tensor [B, H, W] or [Tensor],
        "paths": [str], "skipped": [str]}``; paths are ``""`` for items without one; ``skipped`` lists
        the files of the dropped items.
    """
    images, masks, paths, skipped = [], [], [], []
    for item in items:
        if isinstance(item, Skipped):
            skipped.append(item.path)
            continue
        if isinstance(item, dict):
            image, mask, path = item["image"], item["mask"], item.get("path", "")
        else:
            image, mask, *rest = item
            path = rest[0] if rest else ""
        images.append(image)
        masks.append(mask)
        paths.append(str(path))
    return {"images": _stack_if_same(images), "masks": _stack_if_same(masks), "paths": paths,
            "skipped": skipped}  # fmt: skip


def _stack_if_same(tensors: list[Tensor]) -> Tensor | list[Tensor]:
    if tensors and all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack([t.as_subclass(Tensor) for t in tensors])
    return tensors
