"""Oriented-box data sets: DOTA-v1.0 and STAR folders with rotated boxes for torchvision's v2 transforms.

A folder holds ``images/`` and ``annfiles/`` (what ``monatune split`` and the STAR release write) or
``labelTxt/`` (raw DOTA, with its ``imagesource:`` / ``gsd:`` header lines); one ``.txt`` per image,
one object per line: ``x1 y1 x2 y2 x3 y3 x4 y4 class difficult``. A folder with ``images/`` only is a
test set without annotations, as mmrotate lists the images of DOTA's test split.

Each polygon becomes its minimum-area rectangle in mmrotate's le90 convention
(:func:`monatune.ops.polygons_to_le90`, where mmrotate calls ``cv2.minAreaRect``), kept in the target as
``tv_tensors.BoundingBoxes(format="CXCYWHR")`` (torchvision: degrees, counter-clockwise), so the v2
transforms move boxes with the image. A malformed line (too few numbers, a class not in the list, a
rectangle side under ``min_side`` pixels, as mmrotate drops) is named by file and line and dropped and
counted, or stops the run (``on_bad_annotation="error"``). mmrotate's own loader reads none of these
checks (a short line is skipped silently by its split tool, a bad class raises a ``KeyError``).

H2RBox trains on horizontal boxes (``horizontal_boxes=True``: each rotated box becomes its
circumscribed horizontal box, :func:`monatune.ops.le90_to_hbb`, before the transforms, as the release's
WSOOD data sets); evaluation targets keep the rotated boxes. mmrotate's pipelines are written here as
v2 transforms with its exact box maths: :class:`RResize` and :class:`RRandomFlip`.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..ops import le90_to_cxcywhr, le90_to_hbb, polygons_to_le90
from .classification import BadAnnotationError
from .images import _check_on_bad_image, open_image, Skipped
from .large_images import unlimited_pixels

__all__ = [
    "DOTA_CLASSES", "STAR_CLASSES", "OrientedDataset", "read_oriented", "read_dota", "read_star", "read_labels",
    "read_devkit_labels", "RResize", "RRandomFlip", "oriented_transforms", "flip_probabilities",
    "collate_oriented",
]  # fmt: skip

DOTA_CLASSES = (
    "plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle", "large-vehicle", "ship",
    "tennis-court", "basketball-court", "storage-tank", "soccer-ball-field", "roundabout", "harbor",
    "swimming-pool", "helicopter",
)  # fmt: skip
STAR_CLASSES = (
    "ship", "boat", "crane", "goods_yard", "tank", "storehouse", "breakwater", "dock", "airplane",
    "boarding_bridge", "runway", "taxiway", "terminal", "apron", "gas_station", "truck", "car", "truck_parking",
    "car_parking", "bridge", "cooling_tower", "chimney", "vapor", "smoke", "genset", "coal_yard", "lattice_tower",
    "substation", "wind_mill", "cement_concrete_pavement", "toll_gate", "flood_dam", "gravity_dam", "ship_lock",
    "ground_track_field", "basketball_court", "engineering_vehicle", "foundation_pit", "intersection",
    "soccer_ball_field", "tennis_court", "tower_crane", "unfinished_building", "arch_dam", "roundabout",
    "baseball_diamond", "stadium", "containment_vessel",
)  # fmt: skip
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_HEADERS = ("imagesource:", "gsd:")
_WARN_LINES = 5


def read_labels(path: str | Path) -> tuple[list[tuple[list[float], str, int, int]], list[str]]:
    """The objects of one DOTA-format ``.txt``: ``(polygon, class, difficult, line number)`` and problem lines.

    Header lines (``imagesource:``, ``gsd:``) and blank lines are skipped; ``difficult`` defaults to 0
    (as the devkit's split tool reads it). Lines that are not 8 numbers and a class are problems.
    """
    objects, problems = [], []
    for n, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        tokens = line.split()
        if not tokens or tokens[0].lower().startswith(_HEADERS):
            continue
        if len(tokens) < 9:
            problems.append(f"{path}:{n}: {len(tokens)} fields, need x1 y1 ... x4 y4 class [difficult]")
            continue
        try:
            polygon = [float(v) for v in tokens[:8]]
            difficult = int(float(tokens[9])) if len(tokens) > 9 else 0
        except ValueError:
            problems.append(f"{path}:{n}: coordinates or difficult flag not numbers: {line.strip()!r}")
            continue
        if not all(math.isfinite(v) for v in polygon):
            problems.append(f"{path}:{n}: coordinates are not finite: {line.strip()!r}")
            continue
        objects.append((polygon, tokens[8], difficult, n))
    return objects, problems


def read_devkit_labels(folder: str | Path, image_ids: Sequence[str]) -> dict[str, list[tuple[list[float], str, int]]]:
    """Ground truth for :func:`monatune.metrics.rotated.dota_devkit_map` from a ``labelTxt`` folder:
    image id -> ``(polygon, class, difficult)``, every id of ``image_ids`` (no file: no objects)."""
    folder = Path(folder)
    truth = {}
    for image_id in image_ids:
        path = folder / f"{image_id}.txt"
        truth[image_id] = [(p, c, d) for p, c, d, _ in read_labels(path)[0]] if path.is_file() else []
    return truth


def _image_files(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}


def _image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` from the header (no decoding); ``(0, 0)`` when unreadable (found when loaded)."""
    try:
        with unlimited_pixels(), Image.open(path) as image:
            return image.size[1], image.size[0]
    except (OSError, ValueError, SyntaxError):
        return 0, 0


class OrientedDataset(Dataset):
    """Images with rotated-box targets; ``dataset[i]`` is ``transforms(image, target)``.

    ``image`` is a ``tv_tensors.Image`` uint8 ``[3, H, W]`` (``None`` with ``pixels=False``: the task then
    reads the file by windows); ``target`` holds, for the ``N`` objects:

    - ``boxes`` (``tv_tensors.BoundingBoxes`` float32 ``[N, 5]``, format ``CXCYWHR``: ``cx, cy, w, h`` in
      pixels and the angle in degrees counter-clockwise, ``canvas_size=(H, W)``);
    - ``labels`` (int64 ``[N]``, ``1..K``; ``classes[k - 1]`` names label ``k``);
    - ``difficult`` (int64 ``[N]``: the file's flag, 2 for objects cut by a split window);
    - ``image_id`` (the file stem) and ``path``.

    Args:
        paths: image file of each item.
        boxes: per image, le90 boxes ``[N, 5]`` (numpy).
        labels: per image, labels ``[N]``.
        difficult: per image, flags ``[N]``.
        classes: the class names.
        problems: one line per annotation dropped while reading.
        has_annotations: whether the folder had annotation files (a test split may not).
        horizontal_boxes: give each box as its circumscribed horizontal box (training H2RBox).
        transforms: called as ``transforms(image, target)``.
        on_bad_image: ``"error"`` or ``"skip"``.
        pixels: decode the image (``False``: ``None`` in its place, for whole-image inference by windows).
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        boxes: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        difficult: Sequence[np.ndarray],
        classes: Sequence[str],
        *,
        problems: Sequence[str] = (),
        has_annotations: bool = True,
        horizontal_boxes: bool = False,
        transforms: Callable | None = None,
        on_bad_image: str = "error",
        pixels: bool = True,
    ) -> None:
        _check_on_bad_image(on_bad_image)
        self._paths = [str(p) for p in paths]
        self._boxes, self._labels, self._difficult = list(boxes), list(labels), list(difficult)
        self.classes = list(classes)
        self.problems, self.has_annotations = list(problems), has_annotations
        self.horizontal_boxes, self.transforms, self.on_bad_image, self.pixels = horizontal_boxes, transforms, on_bad_image, pixels
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, i: int) -> str:
        return self._paths[i]

    def num_objects(self, i: int) -> int:
        return len(self._labels[i])

    def __getitem__(self, i: int) -> tuple[Any, dict[str, Any]] | Skipped:
        path = self._paths[i]
        if self.pixels:
            with unlimited_pixels():
                pil = open_image(path, self.on_bad_image)
            if isinstance(pil, Skipped):
                self.skipped += 1
                return pil
            image: Any = tv_tensors.Image(F.pil_to_tensor(pil))
            size = (pil.height, pil.width)
        else:
            image, size = None, _image_size(Path(path))
        boxes = torch.as_tensor(self._boxes[i], dtype=torch.float32).reshape(-1, 5)
        if self.horizontal_boxes:
            boxes = le90_to_hbb(boxes)
        target = {
            "boxes": tv_tensors.BoundingBoxes(le90_to_cxcywhr(boxes), format="CXCYWHR", canvas_size=size),
            "labels": torch.as_tensor(self._labels[i], dtype=torch.int64),
            "difficult": torch.as_tensor(self._difficult[i], dtype=torch.int64),
            "image_id": Path(path).stem,
            "path": path,
        }  # fmt: skip
        if self.transforms is not None and image is not None:
            image, target = self.transforms(image, target)
        return image, target

    def subset(self, indices: Sequence[int], **changes: Any) -> "OrientedDataset":
        """The items at ``indices`` with this set's settings (``changes`` replace some)."""
        settings = dict(problems=self.problems, has_annotations=self.has_annotations,
                        horizontal_boxes=self.horizontal_boxes, transforms=self.transforms,
                        on_bad_image=self.on_bad_image, pixels=self.pixels)  # fmt: skip
        settings.update(changes)
        pick = lambda items: [items[i] for i in indices]  # noqa: E731
        return OrientedDataset(pick(self._paths), pick(self._boxes), pick(self._labels), pick(self._difficult),
                               self.classes, **settings)  # fmt: skip

    def training_subset(self) -> tuple["OrientedDataset", int]:
        """mmrotate's ``filter_empty_gt``: the images with at least one object, and how many were left out."""
        keep = [i for i in range(len(self)) if self.num_objects(i)]
        return self.subset(keep), len(self) - len(keep)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, {len(self.classes)} classes, "
                f"{len(self.problems)} annotations dropped)")  # fmt: skip


def read_oriented(
    folder: str | Path,
    *,
    classes: Sequence[str],
    on_bad_annotation: str = "drop",
    on_bad_image: str = "error",
    transforms: Callable | None = None,
    horizontal_boxes: bool = False,
    min_side: float = 2.0,
    pixels: bool = True,
) -> OrientedDataset:
    """Read a DOTA-format folder (``images/`` with ``annfiles/`` or ``labelTxt/``, or ``images/`` alone).

    Args:
        folder: The split's folder.
        classes: Class names; label ``k`` is ``classes[k - 1]``.
        on_bad_annotation: ``"drop"`` (drop the object, list it in ``problems``, warn once) or ``"error"``.
        on_bad_image: ``"error"`` (missing images are found at once) or ``"skip"``.
        transforms: Called as ``transforms(image, target)``, e.g. :func:`oriented_transforms`.
        horizontal_boxes: Targets as circumscribed horizontal boxes (H2RBox training).
        min_side: Objects whose minimum-area rectangle has a side under this many pixels are dropped
            (mmrotate's ``poly2obb_np`` drops sides under 2).
        pixels: Decode images when an item is read (``False``: whole-image inference reads them by windows).

    Example:
        >>> ds = read_dota("data/split_ss_dota/trainval", transforms=oriented_transforms(True))
        >>> image, target = ds[0]
    """
    if on_bad_annotation not in ("drop", "error"):
        raise ValueError(f"on_bad_annotation must be one of drop, error, got {on_bad_annotation!r}")
    _check_on_bad_image(on_bad_image)
    folder = Path(folder).expanduser()
    if not (folder / "images").is_dir():
        raise FileNotFoundError(f"'{folder}' has no images/ folder; an oriented-detection split holds images/ and "
                                "annfiles/ (or DOTA's labelTxt/)")  # fmt: skip
    labels_dir = next((folder / d for d in ("annfiles", "labelTxt") if (folder / d).is_dir()), None)
    images = _image_files(folder / "images")
    index = {name: k for k, name in enumerate(classes, 1)}
    paths, boxes, labels, difficult, problems, total = [], [], [], [], [], 0
    stems = sorted(images) if labels_dir is None else sorted(p.stem for p in labels_dir.glob("*.txt"))
    for stem in stems:
        objects: list[tuple[list[float], str, int, int]] = []
        if labels_dir is not None:
            objects, found = read_labels(labels_dir / f"{stem}.txt")
            total += len(objects) + len(found)
            problems += found
            if stem not in images:
                problems.append(f"{labels_dir / stem}.txt: no image {stem}{{{','.join(IMAGE_SUFFIXES)}}} in {folder / 'images'}")
                if on_bad_image == "error":
                    raise FileNotFoundError(f"{problems[-1]}; add it, or set data.on_bad_image=skip to leave it out")
                continue
        known = [(p, c, d, n) for p, c, d, n in objects if c in index]
        for _, c, _, n in objects:
            if c not in index:
                problems.append(f"{labels_dir / stem}.txt:{n}: class {c!r} is not one of the {len(index)} classes")
        rects = polygons_to_le90(np.array([p for p, *_ in known], np.float64).reshape(-1, 8)).numpy()
        good = (rects[:, 2] >= min_side) & (rects[:, 3] >= min_side) if len(rects) else np.zeros(0, bool)
        for (_, _, _, n), ok, r in zip(known, good, rects):
            if not ok:
                problems.append(f"{labels_dir / stem}.txt:{n}: degenerate polygon (rectangle {r[2]:.2f} x {r[3]:.2f} px, "
                                f"a side under {min_side:g})")  # fmt: skip
        if problems and on_bad_annotation == "error":
            raise BadAnnotationError(f"{problems[0]}; fix it, or set on_bad_annotation='drop'")
        paths.append(images[stem])
        boxes.append(rects[good].astype(np.float32))
        labels.append(np.array([index[c] for (_, c, _, _), ok in zip(known, good) if ok], np.int64))
        difficult.append(np.array([d for (_, _, d, _), ok in zip(known, good) if ok], np.int64))
    if problems:
        more = f"\n  ... and {len(problems) - _WARN_LINES} more" if len(problems) > _WARN_LINES else ""
        warnings.warn(f"dropped {len(problems)} malformed annotation(s) of {total} read from '{folder}' (all listed in "
                      f"dataset.problems):\n  " + "\n  ".join(problems[:_WARN_LINES]) + more, stacklevel=2)  # fmt: skip
    return OrientedDataset(paths, boxes, labels, difficult, classes, problems=problems,
                           has_annotations=labels_dir is not None, horizontal_boxes=horizontal_boxes,
                           transforms=transforms, on_bad_image=on_bad_image, pixels=pixels)  # fmt: skip


def read_dota(folder: str | Path, **kwargs: Any) -> OrientedDataset:
    """:func:`read_oriented` with DOTA-v1.0's 15 classes."""
    return read_oriented(folder, **{"classes": DOTA_CLASSES, **kwargs})


def read_star(folder: str | Path, **kwargs: Any) -> OrientedDataset:
    """:func:`read_oriented` with STAR's 48 classes."""
    return read_oriented(folder, **{"classes": STAR_CLASSES, **kwargs})


# --- transforms ----------------------------------------------------------------------------------


def _rotated_boxes(inpt: Any) -> bool:
    return isinstance(inpt, tv_tensors.BoundingBoxes) and inpt.format == tv_tensors.BoundingBoxFormat.CXCYWHR


class RResize(v2.Transform):
    """mmrotate's ``RResize(img_scale=(size, size))``: keep the ratio, the long side fits ``size``.

    The size is rounded as mmcv (``int(side * scale + 0.5)``) and the image resized bilinearly without
    antialiasing (cv2's ``INTER_LINEAR``); boxes scale ``cx`` by the width's factor, ``cy`` by the
    height's and ``w``, ``h`` by the square root of their product, the angle unchanged, as mmrotate does
    (torchvision's resize would refit the rotated rectangle).
    """

    def __init__(self, size: int = 1024) -> None:
        super().__init__()
        self.size = int(size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        scale = min(self.size / max(h, w), self.size / min(h, w))
        new = (int(h * scale + 0.5), int(w * scale + 0.5))
        return {"size": new, "sx": new[1] / w, "sy": new[0] / h}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["sx"] == 1.0 and params["sy"] == 1.0:
            return inpt
        if _rotated_boxes(inpt):
            out = inpt.as_subclass(torch.Tensor).clone()
            out[:, 0] *= params["sx"]
            out[:, 1] *= params["sy"]
            out[:, 2:4] *= math.sqrt(params["sx"] * params["sy"])
            return tv_tensors.wrap(out, like=inpt, canvas_size=params["size"])
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)) or isinstance(inpt, torch.Tensor) and inpt.ndim == 3:
            return F.resize(inpt, list(params["size"]), antialias=False)
        return inpt


class RRandomFlip(v2.Transform):
    """mmrotate's ``RRandomFlip(flip_ratio=[0.25] * 3, direction=[horizontal, vertical, diagonal])``.

    Its box maths: horizontal ``cx' = W - cx - 1``, vertical ``cy' = H - cy - 1``, both with the angle
    mirrored (le90 ``pi - theta``, which is ``-r`` in torchvision's degrees); diagonal flips both
    coordinates and keeps the angle. (torchvision's flips put ``cx`` at ``W - cx``.)
    """

    DIRECTIONS = ("horizontal", "vertical", "diagonal")

    def __init__(self, p: Sequence[float] = (0.25, 0.25, 0.25)) -> None:
        super().__init__()
        if len(p) != 3 or any(v < 0 for v in p) or sum(p) > 1:
            raise ValueError(f"flip probabilities (horizontal, vertical, diagonal) must be >= 0 and sum to <= 1, got {p}")
        self.p = [float(v) for v in p]

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        u, edge = float(torch.rand(())), 0.0
        for direction, p in zip(self.DIRECTIONS, self.p):
            edge += p
            if u < edge:
                return {"direction": direction, "size": v2.query_size(flat_inputs)}
        return {"direction": None, "size": None}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        direction = params["direction"]
        if direction is None:
            return inpt
        horizontal, vertical = direction in ("horizontal", "diagonal"), direction in ("vertical", "diagonal")
        if _rotated_boxes(inpt):
            h, w = params["size"]
            out = inpt.as_subclass(torch.Tensor).clone()
            if horizontal:
                out[:, 0] = w - out[:, 0] - 1
            if vertical:
                out[:, 1] = h - out[:, 1] - 1
            if direction != "diagonal":
                out[:, 4] = -out[:, 4]
            return tv_tensors.wrap(out, like=inpt)
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)) or isinstance(inpt, torch.Tensor) and inpt.ndim == 3:
            if horizontal:
                inpt = F.horizontal_flip(inpt)
            if vertical:
                inpt = F.vertical_flip(inpt)
        return inpt


FLIPS = {
    "three-way": (0.25, 0.25, 0.25),  # RRandomFlip(flip_ratio=[0.25] * 3, direction=[horizontal, vertical, diagonal])
    "horizontal": (0.5, 0.0, 0.0),  # RRandomFlip(flip_ratio=0.5): the data-set bases' default
}


def flip_probabilities(flip: bool | str) -> tuple[float, float, float] | None:
    """The (horizontal, vertical, diagonal) probabilities of a ``flip`` setting: ``True`` or
    ``"three-way"``, ``"horizontal"``, or ``False`` / ``"none"`` (no flip: None)."""
    if flip is False or flip == "none":
        return None
    if flip is True:
        return FLIPS["three-way"]
    if flip not in FLIPS:
        raise ValueError(f"`flip` must be true, false, 'none' or one of {tuple(FLIPS)}, got {flip!r}")
    return FLIPS[flip]


def oriented_transforms(train: bool, *, size: int = 1024, flip: bool | str = True) -> Callable:
    """The release's oriented-detection pipeline: training ``RResize(size)`` then the random flip
    (:func:`flip_probabilities`; default three-way); evaluation keeps the image (the detector resizes,
    if asked, and maps its boxes back). Images become float32 in [0, 1]."""
    p = flip_probabilities(flip)
    steps: list[Any] = [RResize(size)] + ([RRandomFlip(p)] if p is not None else []) if train else []
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])


def collate_oriented(items: Sequence[tuple[Any, dict[str, Any]] | Skipped]) -> dict[str, Any]:
    """Batch oriented items as lists, dropping :class:`~monatune.data.images.Skipped` markers:
    ``{"images", "targets", "paths", "skipped"}`` (each target's ``path`` moves to ``paths``)."""
    kept = [item for item in items if not isinstance(item, Skipped)]
    return {
        "images": [image for image, _ in kept],  # None for items read without pixels (whole-image inference)
        "targets": [{k: v for k, v in target.items() if k != "path"} for _, target in kept],
        "paths": [target["path"] for _, target in kept],
        "skipped": [item.path for item in items if isinstance(item, Skipped)],
    }
