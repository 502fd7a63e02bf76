"""Object-detection and instance-segmentation data sets in torchvision's detection format.

:func:`read_coco` reads an image folder and a COCO instances JSON; :func:`read_voc` reads Pascal VOC
XML (one year or "07+12"). Both give a :class:`DetectionDataset` whose items are
``(tv_tensors.Image uint8 [3, H, W], target)``, ready for ``torchvision.transforms.v2`` and for
torchvision's detectors. Annotations are read and checked once, when the data set is built; a
malformed annotation is dropped and reported (``problems`` and one warning) or raises
:class:`BadAnnotationError` (``on_bad_annotation="error"``). Images are opened lazily.

torchvision's ``CocoDetection`` / ``VOCDetection`` (with ``wrap_dataset_for_transforms_v2``) were
considered: they check no annotation (an empty box or polygon reaches the model, or crashes
pycocotools), VOCDetection parses each XML only when its item is read (a broken file fails
mid-epoch), and the VOC wrapper drops the ``difficult`` flag. So files are read here; masks are
decoded by pycocotools, boxes and transforms are torchvision's.
"""
from __future__ import annotations

import json
import math
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .classification import VOC_CLASSES, BadAnnotationError
from .images import _SKIP_HINT, BadImageError, Skipped, _check_on_bad_image, open_image

__all__ = [
    "ON_BAD_ANNOTATION",
    "DetectionDataset",
    "read_coco",
    "read_voc",
    "detection_transforms",
    "collate_detection",
    "RandomSizeCrop",
]

ON_BAD_ANNOTATION = ("drop", "error")
BACKGROUND = "__background__"
_PER_INSTANCE = ("labels", "iscrowd", "area", "difficult")  # tensors indexed like ``boxes``
_RASTERISE_BELOW = 64.0  # px²: polygons smaller than this are rasterised at build time to find empty masks
_WARN_LINES = 5


class DetectionDataset(Dataset):
    """Images with detection targets; ``dataset[i]`` is ``transforms(image, target)``.

    ``image`` is a ``tv_tensors.Image`` uint8 ``[3, H, W]``; ``target`` holds, for the ``N`` objects:

    - ``boxes`` (``tv_tensors.BoundingBoxes`` float32 ``[N, 4]``): ``x1, y1, x2, y2`` in pixels,
      ``canvas_size=(H, W)``, inside the image.
    - ``labels`` (int64 ``[N]``): ``1..K``, ``classes[label]`` names it (``classes[0]`` is background).
    - ``masks`` (``tv_tensors.Mask`` uint8 ``[N, H, W]``): only for data read with masks.
    - ``iscrowd`` (int64 ``[N]``): 1 for crowd regions, which are kept; training should leave them
      out of its targets and evaluation ignores them.
    - ``area`` (float32 ``[N]``): COCO's ``area`` (mask area, original pixels), else the box area.
    - ``difficult`` (bool ``[N]``): VOC only; difficult objects are kept and flagged, as VOC
      evaluation ignores them rather than counting them as misses.
    - ``image_id`` (int): COCO's image id; for VOC the item's index.
    - ``path`` (str): the image file (:func:`collate_detection` moves it out of the target).

    An unreadable image raises :class:`BadImageError` (``on_bad_image="error"``) or gives a
    :class:`~monatune.data.images.Skipped` marker (``"skip"``); ``skipped`` counts those in this process only.

    Args:
        paths: image file of each item.
        sizes: ``(H, W)`` of each image as the annotations give it; a decoded image of another size
            is a bad image.
        targets: per image, numpy arrays ``boxes`` ``[N, 4]`` xyxy, ``labels``, ``iscrowd``, ``area``
            (and ``difficult``), plus ``segmentation`` (pycocotools RLEs or polygon lists) with masks.
        image_ids: the ``image_id`` of each item.
        classes: ``["__background__", name of label 1, ...]``.
        cat_ids: the source's category id of each label ``1..K`` (for writing COCO results).
        problems: one line per annotation dropped while reading.
        masks: whether targets carry ``masks``.
        transforms: called as ``transforms(image, target)`` (``torchvision.transforms.v2`` style).
        on_bad_image: ``"error"`` or ``"skip"``.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        sizes: Sequence[tuple[int, int]],
        targets: Sequence[dict[str, Any]],
        image_ids: Sequence[int],
        classes: Sequence[str],
        cat_ids: Sequence[int],
        *,
        problems: Sequence[str] = (),
        masks: bool = False,
        transforms: Callable | None = None,
        on_bad_image: str = "error",
    ) -> None:
        _check_on_bad_image(on_bad_image)
        if not len(paths) == len(sizes) == len(targets) == len(image_ids):
            raise ValueError(f"got {len(paths)} paths, {len(sizes)} sizes, {len(targets)} targets and "
                             f"{len(image_ids)} image ids; they must be as many")  # fmt: skip
        if len(cat_ids) != len(classes) - 1:
            raise ValueError(f"need one category id per class after {BACKGROUND!r}, got {len(cat_ids)} ids for "
                             f"{len(classes)} classes")  # fmt: skip
        self._paths = [str(p) for p in paths]
        self._sizes = [(int(h), int(w)) for h, w in sizes]
        self._targets = list(targets)
        self.image_ids = [int(i) for i in image_ids]
        self.classes = list(classes)
        self.cat_ids = [int(c) for c in cat_ids]
        self.problems = list(problems)
        self.masks = masks
        self.transforms = transforms
        self.on_bad_image = on_bad_image
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, i: int) -> str:
        """Image file of item ``i``."""
        return self._paths[i]

    def __getitem__(self, i: int) -> tuple[Any, dict[str, Any]] | Skipped:
        path, (h, w) = self._paths[i], self._sizes[i]
        pil = open_image(path, self.on_bad_image, size=(w, h))
        if isinstance(pil, Skipped):
            self.skipped += 1
            return pil
        image = tv_tensors.Image(F.pil_to_tensor(pil))
        target = self._target(i, h, w)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _target(self, i: int, h: int, w: int) -> dict[str, Any]:
        t = self._targets[i]
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4),
                                              format="XYXY", canvas_size=(h, w)),
            "labels": torch.as_tensor(t["labels"], dtype=torch.int64),
            "iscrowd": torch.as_tensor(t["iscrowd"], dtype=torch.int64),
            "area": torch.as_tensor(t["area"], dtype=torch.float32),
        }  # fmt: skip
        if "difficult" in t:
            target["difficult"] = torch.as_tensor(t["difficult"], dtype=torch.bool)
        if self.masks:
            rles = [_to_rle(s, h, w) for s in t["segmentation"]]
            decoded = mask_utils.decode(rles) if rles else np.zeros((h, w, 0), np.uint8)  # H, W, N
            target["masks"] = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1))))
        target["image_id"] = self.image_ids[i]
        target["path"] = self._paths[i]
        return target

    def subset(self, indices: Sequence[int]) -> "DetectionDataset":
        """The items at ``indices``, with this set's classes, transforms and settings."""
        return DetectionDataset(
            [self._paths[i] for i in indices], [self._sizes[i] for i in indices], [self._targets[i] for i in indices],
            [self.image_ids[i] for i in indices], self.classes, self.cat_ids, problems=self.problems, masks=self.masks,
            transforms=self.transforms, on_bad_image=self.on_bad_image,
        )  # fmt: skip

    def training_subset(self, min_size: int = 32) -> tuple["DetectionDataset", int]:
        """mmdetection 2.x's training filter (``filter_empty_gt=True``, ``_filter_imgs(min_size=32)``).

        Keeps the images that have at least one annotation (crowd regions and difficult objects
        count, as in mmdetection's COCO and VOC datasets) and whose shorter side is at least
        ``min_size``. Returns the subset and the number of images left out.
        """
        keep = [i for i, (t, (h, w)) in enumerate(zip(self._targets, self._sizes)) if len(t["labels"]) and min(h, w) >= min_size]
        return self.subset(keep), len(self) - len(keep)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, {len(self.classes) - 1} classes, masks={self.masks}, "
                f"{len(self.problems)} annotations dropped)")  # fmt: skip


# --- COCO ----------------------------------------------------------------------------------------


def read_coco(
    images: str | Path,
    annotations: str | Path,
    *,
    masks: bool = True,
    on_bad_annotation: str = "drop",
    on_bad_image: str = "error",
    transforms: Callable | None = None,
) -> DetectionDataset:
    """Read a COCO-format detection / instance-segmentation set.

    Categories sorted by id become labels ``1..K`` (``cat_ids`` maps back); items are the JSON's
    images sorted by id, those without annotations included (empty targets). Boxes ``[x, y, w, h]``
    become ``x1, y1, x2, y2``. A box partly outside its image is clipped to it (COCO has many that
    overshoot by rounding, under a pixel); one entirely outside it is malformed. Also malformed: ``w <= 0`` or
    ``h <= 0``, a missing or non-numeric box, a category or image id the JSON does not define and,
    with ``masks``, a missing or empty mask (no polygon of 3 or more points, zero area, an RLE of
    another size). Polygons of fewer than 3 points inside an otherwise good segmentation are left
    out, as detectron2 does. Polygons are checked by their area; those under 64 px² are rasterised
    to check they cover a pixel (rasterising every polygon of COCO train would take minutes).

    Args:
        images: folder the JSON's ``file_name`` entries are relative to.
        annotations: the instances JSON (``images``, ``annotations``, ``categories``).
        masks: decode ``segmentation`` (polygons, RLE with a counts list or compressed) into ``masks``.
        on_bad_annotation: ``"drop"`` drops a malformed annotation, lists it in ``problems`` and warns
            once; ``"error"`` raises :class:`BadAnnotationError` naming the file and annotation id.
        on_bad_image: ``"error"`` raises :class:`BadImageError` (and checks at once that every image
            exists); ``"skip"`` makes ``dataset[i]`` a ``Skipped`` marker.
        transforms: called as ``transforms(image, target)``, e.g. :func:`detection_transforms`.

    Example:
        >>> ds = read_coco("coco/val2017", "coco/annotations/instances_val2017.json",
        ...                transforms=detection_transforms(False, kind="coco"))
        >>> image, target = ds[0]
    """
    _check_on_bad_annotation(on_bad_annotation)
    _check_on_bad_image(on_bad_image)
    images, json_file = Path(images).expanduser(), Path(annotations).expanduser()
    if not images.is_dir():
        raise FileNotFoundError(f"COCO image folder '{images}' does not exist or is not a folder")
    if not json_file.is_file():
        raise FileNotFoundError(f"COCO annotation file '{json_file}' does not exist")
    try:
        with open(json_file) as f:
            data = json.load(f)
        image_list, ann_list, cat_list = data["images"], data["annotations"], data["categories"]
        cats = sorted((int(c["id"]), str(c["name"])) for c in cat_list)
        infos = {int(im["id"]): (str(im["file_name"]), int(im["height"]), int(im["width"])) for im in image_list}
    except (OSError, ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
        reason = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise BadAnnotationError(f"cannot read COCO annotations '{json_file}' ({reason}); it needs 'images' (id, "
                                 "file_name, height, width), 'annotations' and 'categories' (id, name)") from e
    if len(infos) != len(image_list) or len({c for c, _ in cats}) != len(cats):
        raise BadAnnotationError(f"'{json_file}' repeats an image id or a category id")
    label_of = {cat_id: k for k, (cat_id, _) in enumerate(cats, 1)}
    per_image: dict[int, list[tuple[list[float], int, int, float, Any]]] = {i: [] for i in infos}
    problems = []
    for n, ann in enumerate(ann_list):
        try:
            record = _check_coco_annotation(ann, infos, label_of, masks)
        except _Malformed as e:
            where = f"annotation id {ann.get('id', f'? (#{n})')}" if isinstance(ann, dict) else f"annotation #{n}"
            if isinstance(ann, dict) and "image_id" in ann:
                where += f" (image {ann['image_id']})"
            problems.append(f"{json_file}: {where}: {e}")
            if on_bad_annotation == "error":
                raise BadAnnotationError(f"{problems[-1]}; fix it, or set on_bad_annotation='drop'") from None
            continue
        per_image[int(ann["image_id"])].append(record)
    _warn_dropped(problems, len(ann_list), json_file)
    ids = sorted(infos)
    paths = [images / infos[i][0] for i in ids]
    if on_bad_image == "error":
        _check_exist(paths, json_file)
    targets = []
    for i in ids:
        records = per_image[i]
        targets.append({
            "boxes": np.array([r[0] for r in records], np.float32).reshape(-1, 4),
            "labels": np.array([r[1] for r in records], np.int64),
            "iscrowd": np.array([r[2] for r in records], np.int64),
            "area": np.array([r[3] for r in records], np.float32),
            "segmentation": [r[4] for r in records] if masks else [],
        })  # fmt: skip
    return DetectionDataset(
        paths, [infos[i][1:] for i in ids], targets, ids, [BACKGROUND] + [name for _, name in cats],
        [c for c, _ in cats], problems=problems, masks=masks, transforms=transforms, on_bad_image=on_bad_image,
    )  # fmt: skip


class _Malformed(Exception):
    """Why one annotation is unusable (internal: turned into a ``problems`` line or an error)."""


def _check_coco_annotation(
    ann: Any, infos: dict[int, tuple[str, int, int]], label_of: dict[int, int], masks: bool
) -> tuple[list[float], int, int, float, Any]:
    """``(xyxy box, label, iscrowd, area, segmentation)`` of a good annotation, else raise ``_Malformed``."""
    if not isinstance(ann, dict):
        raise _Malformed(f"is a {type(ann).__name__}, not an object")
    for key in ("image_id", "category_id", "bbox"):
        if key not in ann:
            raise _Malformed(f"has no '{key}'")
    image_id, cat_id = ann["image_id"], ann["category_id"]
    if not isinstance(image_id, int) or image_id not in infos:
        raise _Malformed(f"image_id {image_id!r} is not among the {len(infos)} images")
    if not isinstance(cat_id, int) or cat_id not in label_of:
        raise _Malformed(f"category_id {cat_id!r} is not among the categories {sorted(label_of)}")
    _, h, w = infos[image_id]
    box = _clip_box(ann["bbox"], h, w, xywh=True)
    iscrowd = int(bool(ann.get("iscrowd", 0)))
    segmentation = _check_segmentation(ann.get("segmentation"), h, w) if masks else None
    area = ann.get("area")
    if not isinstance(area, (int, float)) or not math.isfinite(area):
        area = (box[2] - box[0]) * (box[3] - box[1])
    return box, label_of[cat_id], iscrowd, float(area), segmentation


def _clip_box(box: Any, h: int, w: int, *, xywh: bool) -> list[float]:
    """``box`` as xyxy clipped to the ``w`` x ``h`` image; raises ``_Malformed`` for an unusable box."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
        raise _Malformed(f"box {box!r} is not four numbers")
    x1, y1, a, b = (float(v) for v in box)
    x2, y2 = (x1 + a, y1 + b) if xywh else (a, b)
    if x2 <= x1 or y2 <= y1:
        size = f"w={a:g}, h={b:g}" if xywh else f"x2={x2:g}, y2={y2:g} vs x1={x1:g}, y1={y1:g}"
        raise _Malformed(f"box {list(box)} is empty (x2 <= x1 or y2 <= y1: {size})")
    clipped = [max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise _Malformed(f"box {list(box)} (xyxy {[x1, y1, x2, y2]}) is entirely outside the {w}x{h} image")
    return clipped


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_segmentation(seg: Any, h: int, w: int) -> Any:
    """The usable part of a COCO segmentation (polygons or an RLE dict); raises ``_Malformed`` if empty."""
    if isinstance(seg, list):  # polygons [[x1, y1, x2, y2, ...], ...]
        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                 and all(_is_number(v) for v in p)]  # fmt: skip
        if not polys:
            raise _Malformed("has no polygon of 3 or more points (empty mask)")
        area = sum(_shoelace(p) for p in polys)
        if area == 0 or (area < _RASTERISE_BELOW and mask_utils.area(_to_rle(polys, h, w)) == 0):
            raise _Malformed("mask polygon covers no pixel (zero area)")
        return polys
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [h, w]:
            raise _Malformed(f"RLE size {seg['size']} is not the image's [{h}, {w}]")
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed: pycocotools would write past the mask if the sum were off
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != h * w:
                raise _Malformed(f"uncompressed RLE counts must be non-negative ints summing to {h}*{w}")
        elif not isinstance(counts, (str, bytes)):
            raise _Malformed(f"RLE counts is a {type(counts).__name__}, not a list or a string")
        try:
            empty = mask_utils.area(_to_rle(seg, h, w)) == 0
        except (ValueError, TypeError) as e:
            raise _Malformed(f"cannot decode RLE ({e})") from None
        if empty:
            raise _Malformed("RLE mask is empty (zero area)")
        return seg
    raise _Malformed(f"segmentation is {type(seg).__name__ if seg is not None else 'missing'}, not polygons or "
                     "an RLE; set masks=False to read boxes only")  # fmt: skip


def _shoelace(p: list[float]) -> float:
    x, y = np.asarray(p[0::2], np.float64), np.asarray(p[1::2], np.float64)
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def _to_rle(seg: Any, h: int, w: int) -> dict:
    """One compressed RLE from polygons, an uncompressed RLE or a compressed one (pycocotools' annToRLE)."""
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, h, w)
    counts = seg["counts"]
    return {"size": list(seg["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


# --- VOC -----------------------------------------------------------------------------------------


def read_voc(
    root: str | Path,
    split: str | Sequence[tuple[str, str]],
    *,
    year: str = "2007",
    classes: Sequence[str] = VOC_CLASSES,
    on_bad_annotation: str = "drop",
    on_bad_image: str = "error",
    transforms: Callable | None = None,
) -> DetectionDataset:
    """Read Pascal VOC detection data from its XML annotations (boxes only, no masks).

    VOC boxes are 1-based inclusive pixel indices; they become ``xmin - 1, ymin - 1, xmax, ymax``
    (the pixel edges, as mmdetection reads them), clipped to the image like COCO boxes. Malformed
    objects (no ``<bndbox>`` or non-numeric, ``xmax < xmin`` or ``ymax < ymin``, entirely outside the
    image, a class not in ``classes``) follow ``on_bad_annotation``, named by XML file and object
    index; an XML file that cannot be read or has no ``<size>`` drops its image the same way.
    Difficult objects are kept, flagged in ``target["difficult"]``.

    Args:
        root: the folder holding ``VOCdevkit/``, the ``VOCdevkit`` folder, or ``VOCdevkit/VOC<year>``.
        split: an image set of ``year`` (``"trainval"``, ``"test"``, ...), or ``(year, image_set)``
            pairs, e.g. ``[("2007", "trainval"), ("2012", "trainval")]`` for "07+12".
        year: the year of a single ``split``.
        classes: object names; label ``k`` is ``classes[k - 1]`` (default: the 20 VOC classes).
        on_bad_annotation: ``"drop"`` or ``"error"``, as in :func:`read_coco`.
        on_bad_image: ``"error"`` or ``"skip"``, as in :func:`read_coco`.
        transforms: called as ``transforms(image, target)``.

    Example:
        >>> ds = read_voc("data", [("2007", "trainval"), ("2012", "trainval")],
        ...               transforms=detection_transforms(True, kind="voc"))
    """
    _check_on_bad_annotation(on_bad_annotation)
    _check_on_bad_image(on_bad_image)
    pairs = [(str(year), split)] if isinstance(split, str) else [(str(y), str(s)) for y, s in split]
    if not pairs:
        raise ValueError("split must be an image-set name or a non-empty list of (year, image_set) pairs")
    classes = [str(c) for c in classes]
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct object names, got {classes}")
    devkit = _voc_devkit(Path(root).expanduser())
    index = {name: k for k, name in enumerate(classes, 1)}
    paths, sizes, targets, problems, n_objects = [], [], [], [], 0
    for y, image_set in pairs:
        base = devkit / f"VOC{y}"
        set_file = base / "ImageSets" / "Main" / f"{image_set}.txt"
        if not set_file.is_file():
            raise FileNotFoundError(f"VOC{y} image set '{image_set}' needs '{set_file}'")
        for name in (line.split()[0] for line in set_file.read_text().splitlines() if line.strip()):
            xml_file = base / "Annotations" / f"{name}.xml"
            size, objects, found = _read_voc_xml(xml_file, index)
            n_objects += len(objects) + len(found)
            problems.extend(f"{xml_file}: {p}" for p in found)
            if found and on_bad_annotation == "error":
                raise BadAnnotationError(f"{problems[-len(found)]}; fix it, or set on_bad_annotation='drop'")
            if size is None:  # the whole file is unusable: drop the image rather than call it background
                continue
            paths.append(base / "JPEGImages" / f"{name}.jpg")
            sizes.append(size)
            targets.append({
                "boxes": np.array([o[0] for o in objects], np.float32).reshape(-1, 4),
                "labels": np.array([o[1] for o in objects], np.int64),
                "iscrowd": np.zeros(len(objects), np.int64),
                "area": np.array([(o[0][2] - o[0][0]) * (o[0][3] - o[0][1]) for o in objects], np.float32),
                "difficult": np.array([o[2] for o in objects], bool),
            })  # fmt: skip
    _warn_dropped(problems, n_objects, devkit)
    if on_bad_image == "error":
        _check_exist(paths, "the VOC image sets")
    return DetectionDataset(
        paths, sizes, targets, range(len(paths)), [BACKGROUND, *classes], range(1, len(classes) + 1),
        problems=problems, masks=False, transforms=transforms, on_bad_image=on_bad_image,
    )  # fmt: skip


def _voc_devkit(root: Path) -> Path:
    if (root / "VOCdevkit").is_dir():
        return root / "VOCdevkit"
    if root.name == "VOCdevkit" and root.is_dir():
        return root
    if root.name.startswith("VOC") and root.parent.name == "VOCdevkit" and root.is_dir():
        return root.parent
    raise FileNotFoundError(f"no VOCdevkit at '{root}': pass the folder holding VOCdevkit/, VOCdevkit itself, or "
                            "VOCdevkit/VOC<year>")  # fmt: skip


def _read_voc_xml(
    xml_file: Path, index: dict[str, int]
) -> tuple[tuple[int, int] | None, list[tuple[list[float], int, bool]], list[str]]:
    """``((H, W) or None, [(xyxy box, label, difficult)], problem lines)`` of one VOC annotation file."""
    try:
        # ElementTree resolves no external entities and (expat >= 2.4.1) limits entity expansion
        tree = ET.parse(xml_file)
        h, w = (int(float(tree.getroot().findtext(f"size/{k}"))) for k in ("height", "width"))
        if h <= 0 or w <= 0:
            raise ValueError(f"size {w}x{h}")
    except (ET.ParseError, OSError, TypeError, ValueError) as e:
        return None, [], [f"cannot read it or its <size> ({type(e).__name__}: {e}); image dropped"]
    objects, problems = [], []
    for k, obj in enumerate(tree.getroot().findall("object")):
        name = (obj.findtext("name") or "").strip()
        try:
            if name not in index:
                raise _Malformed(f"class {name!r} is not one of the {len(index)} classes")
            try:
                x1, y1, x2, y2 = (float(obj.findtext(f"bndbox/{c}")) for c in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                raise _Malformed("needs a <bndbox> with numeric xmin, ymin, xmax, ymax") from None
            if x2 < x1 or y2 < y1:
                raise _Malformed(f"box xmax < xmin or ymax < ymin ({x1:g}, {y1:g}, {x2:g}, {y2:g})")
            box = _clip_box([x1 - 1, y1 - 1, x2, y2], h, w, xywh=False)
        except _Malformed as e:
            problems.append(f"object {k} ({name or 'no name'}): {e}")
            continue
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        objects.append((box, index[name], difficult))
    return (h, w), objects, problems


# --- shared --------------------------------------------------------------------------------------


def _check_on_bad_annotation(value: str) -> None:
    if value not in ON_BAD_ANNOTATION:
        raise ValueError(f"on_bad_annotation must be one of {', '.join(ON_BAD_ANNOTATION)}, got {value!r}")


def _warn_dropped(problems: list[str], total: int, source: Path) -> None:
    if problems:
        first = "\n  ".join(problems[:_WARN_LINES])
        more = f"\n  ... and {len(problems) - _WARN_LINES} more" if len(problems) > _WARN_LINES else ""
        warnings.warn(f"dropped {len(problems)} malformed annotation(s) of {total} read from '{source}' (all listed "
                      f"in dataset.problems):\n  {first}{more}", stacklevel=3)  # fmt: skip


def _check_exist(paths: Sequence[Path], source: str | Path) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise BadImageError(f"image '{missing[0]}' listed in '{source}' does not exist ({len(missing)} of "
                            f"{len(paths)} are missing); fix the paths, {_SKIP_HINT}")  # fmt: skip


# --- transforms and batching ---------------------------------------------------------------------


def _per_instance(inputs: Any) -> tuple[Tensor, ...]:
    """What ``SanitizeBoundingBoxes`` must filter with the boxes (masks it finds by itself)."""
    target = inputs[1] if isinstance(inputs, (tuple, list)) else inputs
    return tuple(target[k] for k in _PER_INSTANCE if isinstance(target.get(k), Tensor))


COCO_TRAIN_SCALES = tuple(range(480, 801, 32))
COCO_CROP_SCALES = (400, 500, 600)
COCO_CROP_RANGE = (384, 600)


class MMCVResize(v2.RandomShortestSize):
    """mmdet's ``Resize(img_scale=[(max_size, s) for s in scales], multiscale_mode="value", keep_ratio=True)``.

    One of ``min_size`` at random; the size is rounded as mmcv's ``rescale_size``
    (``int(side * scale + 0.5)``; torchvision's ``RandomShortestSize`` truncates) and the image is
    resized bilinearly without antialiasing, as cv2's ``INTER_LINEAR`` (mmcv's ``imresize``).
    """

    def __init__(self, min_size: Sequence[int], max_size: int) -> None:
        super().__init__(list(min_size), max_size=max_size, antialias=False)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        short = self.min_size[int(torch.randint(len(self.min_size), ()))]
        scale = min(short / min(h, w), self.max_size / max(h, w))
        return dict(size=(int(h * scale + 0.5), int(w * scale + 0.5)))


class RandomSizeCrop(v2.Transform):
    """A random crop whose height and width are drawn from ``[low, min(high, side)]`` (mmdetection's
    ``RandomCrop(crop_type="absolute_range")``), at a random position; boxes are clipped to it."""

    def __init__(self, low: int, high: int) -> None:
        super().__init__()
        if not 0 < low <= high:
            raise ValueError(f"crop range must be 0 < low <= high, got ({low}, {high})")
        self.low, self.high = int(low), int(high)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        ch = int(torch.randint(min(self.low, h), min(self.high, h) + 1, ()))
        cw = int(torch.randint(min(self.low, w), min(self.high, w) + 1, ()))
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def detection_transforms(
    train: bool,
    *,
    kind: str,
    scales: Sequence[int] | None = None,
    max_size: int | None = None,
    crop: bool | None = None,
    crop_scales: Sequence[int] = COCO_CROP_SCALES,
    crop_range: tuple[int, int] = COCO_CROP_RANGE,
    hflip: bool = True,
) -> Callable:
    """The release's detection pipelines as ``torchvision.transforms.v2`` (image and target together).

    Training, ``kind="coco"`` (the Swin detection configs): a flip, then one of two policies at
    random: resize the shorter side to one of ``scales`` (480, 512, ..., 800) with the longer side
    at most ``max_size`` (1333); or resize to one of ``crop_scales`` (400, 500, 600), crop a random
    region of ``crop_range`` (384..600) pixels a side, and resize that to one of ``scales``.
    ``kind="voc"``: a flip and a resize to fit 1000 x 600 keeping the ratio (``scales=(600,)``,
    ``max_size=1000``). Training boxes made empty (under 1 px) are then removed with their labels,
    masks, ``iscrowd``, ``area`` and ``difficult`` (``SanitizeBoundingBoxes``); evaluation keeps every
    box. The image becomes float32 in [0, 1].

    Evaluation keeps the image's size: the detector resizes it (its ``min_size`` / ``max_size``,
    which :class:`~monatune.data.DetectionData` sets from its ``test_scale``) and maps its boxes
    back, so that predictions and metrics are in the original image's pixels, as COCO's area
    ranges need. Images are not normalised here either: torchvision detectors normalise inside
    ``GeneralizedRCNNTransform``, and skip its resize in training (the data resized already).

    Args:
        train: the training pipeline (random) rather than the evaluation one.
        kind: ``"coco"`` or ``"voc"``: which defaults.
        scales: shorter sides to resize to in training.
        max_size: the longest side allowed in training.
        crop: whether the COCO crop policy is one of the choices (default: for COCO).
        crop_scales: shorter sides before the crop.
        crop_range: the crop's smallest and largest side.
        hflip: random horizontal flips in training.
    """
    if kind not in ("coco", "voc"):
        raise ValueError(f"kind must be 'coco' or 'voc', got {kind!r}")
    steps: list[Any] = []
    if train:
        coco = kind == "coco"
        scales = list(scales or (COCO_TRAIN_SCALES if coco else (600,)))
        max_size = max_size or (1333 if coco else 1000)
        resize = MMCVResize(scales, max_size)
        if crop if crop is not None else coco:
            cropped = v2.Compose([MMCVResize(crop_scales, max_size), RandomSizeCrop(*crop_range), MMCVResize(scales, max_size)])
            resize = v2.RandomChoice([resize, cropped])
        steps = ([v2.RandomHorizontalFlip(0.5)] if hflip else []) + [resize]
        # boxes made empty by the resize or crop go, with their labels and masks (mmdet drops boxes under 1 px too)
        steps.append(v2.SanitizeBoundingBoxes(labels_getter=_per_instance))
    # evaluation keeps every ground-truth box, however small: COCOeval and the VOC devkit count them all
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


def collate_detection(items: Sequence[tuple[Any, dict[str, Any]] | Skipped]) -> dict[str, Any]:
    """Batch detection items as lists, dropping :class:`~monatune.data.images.Skipped` markers.

    Returns:
        ``{"images": [Tensor], "targets": [dict], "paths": [str], "skipped": [str]}``; each target's
        ``path`` is moved to ``paths``; ``skipped`` lists the files of the dropped items.
    """
    kept = [item for item in items if not isinstance(item, Skipped)]
    targets = [{k: v for k, v in target.items() if k != "path"} for _, target in kept]
    return {
        "images": [image for image, _ in kept],
        "targets": targets,
        "paths": [target.get("path", "") for _, target in kept],
        "skipped": [item.path for item in items if isinstance(item, Skipped)],
    }
