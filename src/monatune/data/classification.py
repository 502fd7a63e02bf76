"""Image-classification data sets read from local folders into one uniform ``Dataset``.

:func:`build_classification_dataset` reads five layouts (``FORMATS``), detected from the folder
or named with ``format=``:

``imagefolder``  ``root/<split>/<class>/*.jpg`` (torchvision's ``ImageFolder`` layout).
``release``      the Mona release's mmclassification lists: ``root/meta/<split>.txt`` with lines
                 ``relative/path.jpg <label>``, paths relative to ``root/<split>/``.
``flowers102``   torchvision ``Flowers102`` (``flowers-102/jpg``, ``imagelabels.mat``, ``setid.mat``).
``pets``         torchvision ``OxfordIIITPet`` (``oxford-iiit-pet/images``, ``annotations``).
``voc2007``      torchvision ``VOCDetection`` (``VOCdevkit/VOC2007``), single- or multi-label.

Nothing is downloaded. Images are opened lazily, in ``__getitem__``; lists and annotations are
read when the data set is built, so a broken list fails at once and names its file and line.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

# image reading lives in .images; these names stay importable from here
from .images import _IMAGE_ERRORS, _SKIP_HINT, ON_BAD_IMAGE, BadImageError, Skipped, _check_on_bad_image, open_image  # noqa: F401

__all__ = [
    "FORMATS",
    "DEFAULT_SPLITS",
    "VOC_CLASSES",
    "BadImageError",
    "BadAnnotationError",
    "ClassificationDataset",
    "build_classification_dataset",
    "detect_format",
]

FORMATS = ("imagefolder", "release", "flowers102", "pets", "voc2007")
DEFAULT_SPLITS: dict[str, tuple[str, str, str]] = {  # format -> (train, val, test)
    "imagefolder": ("train", "val", "test"),
    "release": ("train", "val", "test"),
    "flowers102": ("train", "val", "test"),
    "pets": ("trainval", "test", "test"),  # no official val split
    "voc2007": ("trainval", "test", "test"),
}
_TORCHVISION_SPLITS = {
    "flowers102": ("train", "val", "test"),
    "pets": ("trainval", "test"),
    "voc2007": ("train", "val", "trainval", "test"),
}
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class BadAnnotationError(ValueError):
    """A list or annotation file does not say what its format requires."""


class ClassificationDataset(Dataset):
    """Images by path with their targets; ``dataset[i]`` is ``(transform(rgb_image), target)``.

    The target is an ``int`` class index, or with ``multilabel`` a float32 tensor ``[num_classes]``
    holding 1 (present), 0 (absent) or -1 (ignore: VOC objects all marked difficult). An unreadable
    image raises :class:`BadImageError` (``on_bad_image="error"``) or gives a
    :class:`~monatune.data.images.Skipped` marker (``"skip"``); ``skipped`` counts those in this process only.

    Args:
        paths: image file of each item.
        targets: ``list[int]``, or a ``[len(paths), num_classes]`` tensor with ``multilabel``.
        classes: class names, index = label.
        format: layout the data came from (one of ``FORMATS``).
        split: split name within that layout.
        multilabel: whether targets are vectors.
        transform: applied to the PIL RGB image.
        on_bad_image: ``"error"`` or ``"skip"``.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        targets: Sequence[int] | Tensor,
        classes: Sequence[str],
        *,
        format: str,
        split: str,
        multilabel: bool = False,
        transform: Callable | None = None,
        on_bad_image: str = "error",
    ) -> None:
        _check_on_bad_image(on_bad_image)
        if len(paths) != len(targets):
            raise ValueError(f"got {len(paths)} paths but {len(targets)} targets")
        if multilabel:
            targets = torch.as_tensor(targets, dtype=torch.float32)
            if targets.shape != (len(paths), len(classes)):
                shape = [len(paths), len(classes)]
                raise ValueError(f"multi-label targets must be {shape}, got {list(targets.shape)}")
        else:
            targets = [int(t) for t in targets]
        self._paths = [str(p) for p in paths]
        self.targets = targets
        self.classes = list(classes)
        self.format = format
        self.split = split
        self.multilabel = multilabel
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, i: int) -> str:
        """Image file of item ``i``."""
        return self._paths[i]

    def __getitem__(self, i: int) -> tuple[Any, int | Tensor] | Skipped:
        image = open_image(self._paths[i], self.on_bad_image)
        if isinstance(image, Skipped):
            self.skipped += 1
            return image
        if self.transform is not None:
            image = self.transform(image)
        return image, (self.targets[i].clone() if self.multilabel else self.targets[i])

    def __repr__(self) -> str:
        kind = "multi-label" if self.multilabel else "single-label"
        return (
            f"{type(self).__name__}(format={self.format!r}, split={self.split!r}, {len(self)} images, "
            f"{len(self.classes)} classes, {kind})"
        )


def build_classification_dataset(
    root: str | Path,
    split: str,
    *,
    format: str = "auto",
    classes: Sequence[str] | str | Path | None = None,
    multilabel: bool = False,
    transform: Callable | None = None,
    on_bad_image: str = "error",
) -> ClassificationDataset:
    """Read one split of a local image-classification data set.

    Args:
        root: data set folder (for the torchvision layouts also the folder holding it, see ``FORMATS``).
        split: split name; ``DEFAULT_SPLITS[format]`` gives (train, val, test) for each format.
        format: one of ``FORMATS``, or ``"auto"`` for :func:`detect_format`.
        classes: class names (index = label), or a text file with one name per line. For
            ``imagefolder`` they are folder names, for ``voc2007`` object names; for the others
            they name the integer labels. Default: what the layout provides (for ``imagefolder`` the
            class folders, each of which must hold an image; name an empty one here to keep it).
        multilabel: VOC only: targets are vectors (1 present, 0 absent, -1 difficult only).
            Without it a VOC image's label is the class of its largest non-difficult object
            (largest object if all are difficult), as in the release's single-label scoring.
        transform: applied to the PIL RGB image.
        on_bad_image: ``"error"`` raises :class:`BadImageError`; ``"skip"`` makes ``dataset[i]`` a ``Skipped`` marker.

    Example:
        >>> ds = build_classification_dataset("data/flowers", "train", transform=T.ToTensor())
        >>> image, label = ds[0]
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)} or 'auto'")
    _check_on_bad_image(on_bad_image)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data root '{root}' does not exist or is not a folder")
    if format == "auto":
        format = detect_format(root)
    if multilabel and format != "voc2007":
        raise ValueError(f"multi-label targets need format 'voc2007' (the data is {format!r}); set multilabel=False")
    names = _class_names(classes)
    check_files = on_bad_image == "error"
    if format == "imagefolder":
        paths, targets, names = _read_imagefolder(root, split, names)
    elif format == "release":
        paths, targets, names = _read_release(root, split, names, check_files)
    elif format == "flowers102":
        paths, targets, names = _read_flowers(root, split, names, check_files)
    elif format == "pets":
        paths, targets, names = _read_pets(root, split, names, check_files)
    else:
        paths, targets, names = _read_voc(root, split, names, multilabel, check_files)
    return ClassificationDataset(
        paths, targets, names, format=format, split=split, multilabel=multilabel,
        transform=transform, on_bad_image=on_bad_image,
    )  # fmt: skip


# Layout checks, first match wins: the torchvision layouts by their folder names, then the
# release lists (which sit next to split folders that also look like an image folder).
_LAYOUTS: tuple[tuple[str, str, Callable[[Path], bool]], ...] = (
    ("voc2007", "VOCdevkit/VOC2007/ (or the VOCdevkit or VOC2007 folder)", lambda d: _voc_parent(d) is not None),
    ("flowers102", "flowers-102/jpg/ (or the flowers-102 folder)",
     lambda d: (d / "flowers-102").is_dir() or (d.name == "flowers-102" and (d / "jpg").is_dir())),
    ("pets", "oxford-iiit-pet/images/ (or the oxford-iiit-pet folder)",
     lambda d: (d / "oxford-iiit-pet").is_dir() or (d.name == "oxford-iiit-pet" and (d / "images").is_dir())),
    ("release", "meta/<split>.txt", lambda d: any((d / "meta").glob("*.txt"))),
    ("imagefolder", "train|val|test/<class>/", lambda d: any(_subfolders(d / s) for s in ("train", "val", "test"))),
)  # fmt: skip


def detect_format(root: str | Path) -> str:
    """Name the layout of ``root`` (one of ``FORMATS``) from the folders and files in it."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data root '{root}' does not exist or is not a folder")
    for name, _, matches in _LAYOUTS:
        if matches(root):
            return name
    entries = sorted(e.name + ("/" if e.is_dir() else "") for e in os.scandir(root))
    found = ", ".join(entries[:20]) + (f", ... ({len(entries)} in all)" if len(entries) > 20 else "") or "nothing"
    expected = "; ".join(f"{name}: {layout}" for name, layout, _ in _LAYOUTS)
    raise ValueError(f"cannot tell the data layout of '{root}', which holds: {found}. Expected one of: {expected}. "
                     "Point root at such a folder or pass format= explicitly")  # fmt: skip


# --- helpers -----------------------------------------------------------------------------------


def _check_split(split: str, available: Sequence[str], where: str) -> None:
    if split not in available:
        raise ValueError(f"unknown split {split!r} for {where}; available: {', '.join(available) or 'none'}")


def _subfolders(d: Path) -> list[str]:
    """Sorted sub-folder names of ``d``, hidden ones (``.ipynb_checkpoints``) left out."""
    if not d.is_dir():
        return []
    return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))


def _is_image_file(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)  # no macOS ._ files


def _has_image(folder: Path) -> bool:
    """Whether ``folder`` or a folder under it holds an image file (the files ``make_dataset`` would take)."""
    for parent, _, files in os.walk(folder, followlinks=True):
        if any(_is_image_file(os.path.join(parent, f)) for f in files):
            return True
    return False


def _read_names_file(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"class-name file '{path}' does not exist")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names or len(set(names)) != len(names):
        raise BadAnnotationError(f"class-name file '{path}' must list one distinct name per line, got {names}")
    return names


def _class_names(classes: Sequence[str] | str | Path | None) -> list[str] | None:
    if classes is None or isinstance(classes, (str, os.PathLike)):
        return None if classes is None else _read_names_file(Path(classes))
    names = [str(c) for c in classes]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"classes must be distinct names (or a text file of them), got {names}")
    return names


def _check_exist(paths: Sequence[Path], where: Callable[[int], str]) -> None:
    """Raise :class:`BadImageError` for the first listed image that is not a file."""
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        i = missing[0]
        raise BadImageError(f"image '{paths[i]}' listed {where(i)} does not exist ({len(missing)} of {len(paths)} "
                            f"listed images are missing); fix the list, {_SKIP_HINT}")  # fmt: skip


def _check_labels(labels: Sequence[int], names: list[str], where: str) -> None:
    bad = [t for t in labels if not 0 <= t < len(names)]
    if bad:
        raise BadAnnotationError(f"label {bad[0]} in {where} is outside the {len(names)} classes; pass classes= "
                                 "with a name for every label")  # fmt: skip


def _torchvision_parent(root: Path, folder: str) -> Path:
    """The folder torchvision wants as root: the one holding ``folder``."""
    if (root / folder).is_dir():
        return root
    if root.name == folder:
        return root.parent
    raise FileNotFoundError(f"'{root}' has no '{folder}' folder; pass the folder that holds it, or '{folder}' itself")


# --- readers: (root, split, names) -> (paths, targets, names) -------------------------------------


def _read_imagefolder(root: Path, split: str, names: list[str] | None) -> tuple[list[str], list[int], list[str]]:
    _check_split(split, _subfolders(root), f"imagefolder data in '{root}' (its sub-folders)")
    split_dir = root / split
    source = "the classes= list"
    if names is None:
        class_dir = root / "train" if (root / "train").is_dir() else split_dir
        names, source = _subfolders(class_dir), f"the class folders of '{class_dir}'"
        if not names:
            raise FileNotFoundError(f"no class folders in '{class_dir}' (expected {class_dir}/<class>/*.jpg)")
        # an empty folder would still be a class (one more output the model never sees an example of)
        empty = [c for c in names if not _has_image(class_dir / c)]
        if empty:
            listed = ", ".join(f"'{class_dir / c}'" for c in empty[:5]) + (" ..." if len(empty) > 5 else "")
            raise ValueError(f"class folder(s) {listed} hold no images ({', '.join(IMG_EXTENSIONS)}); remove "
                             f"them, or pass classes= naming every class, those included, to keep them as "
                             "classes")  # fmt: skip
    for folder in _subfolders(split_dir):
        if folder not in names:
            raise BadAnnotationError(f"class folder '{split_dir / folder}' is not one of the {len(names)} classes "
                                     f"({source}); move it away, or pass classes= with every class")  # fmt: skip
    # torchvision's ImageFolder walk, minus hidden files; a class may have no images in a split
    class_to_idx = {c: i for i, c in enumerate(names)}
    samples = make_dataset(split_dir, class_to_idx, is_valid_file=_is_image_file, allow_empty=True)
    if not samples:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) in the class folders of '{split_dir}'")
    return [p for p, _ in samples], [t for _, t in samples], names


def _read_release_list(path: Path) -> list[tuple[str, int, int]]:
    """``(relative path, label, line number)`` of each non-blank line of a release list."""
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(None, 1)
        try:
            label = int(parts[1])
        except (IndexError, ValueError):
            raise BadAnnotationError(f"line {n} of '{path}' is {line.strip()!r}, not 'relative/path.jpg <int label>'; "
                                     "fix or delete it") from None  # fmt: skip
        if label < 0:
            raise BadAnnotationError(f"label {label} on line {n} of '{path}' is negative; labels count from 0")
        entries.append((parts[0], label, n))
    if not entries:
        raise BadAnnotationError(f"'{path}' lists no images (expected lines 'relative/path.jpg <int label>')")
    return entries


def _read_release(
    root: Path, split: str, names: list[str] | None, check_files: bool
) -> tuple[list[Path], list[int], list[str]]:
    meta = root / "meta"
    _check_split(split, sorted(p.stem for p in meta.glob("*.txt") if p.stem != "classes"), f"'{meta}' lists")
    list_file = meta / f"{split}.txt"
    entries = _read_release_list(list_file)
    source = "the classes= list"
    if names is None and (meta / "classes.txt").is_file():
        names, source = _read_names_file(meta / "classes.txt"), f"'{meta / 'classes.txt'}'"
    elif names is None:
        ref = meta / "train.txt" if (meta / "train.txt").is_file() else list_file
        ref_entries = entries if ref == list_file else _read_release_list(ref)
        names, source = [str(i) for i in range(max(t for _, t, _ in ref_entries) + 1)], f"the labels of '{ref}'"
    for _, label, n in entries:
        if label >= len(names):
            raise BadAnnotationError(f"label {label} on line {n} of '{list_file}' is outside the {len(names)} "
                                     f"classes (0..{len(names) - 1}, from {source}); fix the line or the class "
                                     "list")  # fmt: skip
    paths = [root / split / rel for rel, _, _ in entries]
    if check_files:
        _check_exist(paths, lambda i: f"on line {entries[i][2]} of '{list_file}'")
    return paths, [t for _, t, _ in entries], names


class _Flowers102(datasets.Flowers102):
    # torchvision checks the md5 of imagelabels.mat and setid.mat against the official downloads,
    # because the same check guards its downloader. Reading a local folder needs only the files
    # (checked by name in _read_flowers), so copies re-saved by other tools (or written by tests)
    # are accepted; a file without the keys read from it still fails, naming the file.
    def _check_integrity(self) -> bool:
        return True


def _read_flowers(
    root: Path, split: str, names: list[str] | None, check_files: bool
) -> tuple[list[str], list[int], list[str]]:
    parent = _torchvision_parent(root, "flowers-102")
    _check_split(split, _TORCHVISION_SPLITS["flowers102"], "flowers102")
    base = parent / "flowers-102"
    for need in (base / "jpg", base / "imagelabels.mat", base / "setid.mat"):
        if not need.exists():
            raise FileNotFoundError(f"Flowers102 needs '{need}' (torchvision's layout: flowers-102/jpg, "
                                    "imagelabels.mat, setid.mat)")  # fmt: skip
    try:
        ds = _Flowers102(parent, split=split, download=False, loader=str)  # loader=str: items are (path, label)
        items = [ds[i] for i in range(len(ds))]
    except ImportError:
        raise
    except Exception as e:  # scipy's read errors, missing keys, ids without a label
        raise BadAnnotationError(f"cannot read the Flowers102 split '{split}' from '{base / 'setid.mat'}' and "
                                 f"'{base / 'imagelabels.mat'}' ({type(e).__name__}: {e})") from e  # fmt: skip
    names = names or list(getattr(datasets.Flowers102, "classes", [str(i) for i in range(102)]))
    labels = [int(t) for _, t in items]
    _check_labels(labels, names, f"'{base / 'imagelabels.mat'}'")
    if check_files:
        _check_exist([Path(p) for p, _ in items], lambda i: f"in '{base / 'setid.mat'}'")
    return [p for p, _ in items], labels, names


def _read_pets(
    root: Path, split: str, names: list[str] | None, check_files: bool
) -> tuple[list[Path], list[int], list[str]]:
    parent = _torchvision_parent(root, "oxford-iiit-pet")
    _check_split(split, _TORCHVISION_SPLITS["pets"], "pets")
    ann = parent / "oxford-iiit-pet" / "annotations" / f"{split}.txt"
    if not ann.is_file():
        raise FileNotFoundError(f"Oxford-IIIT Pet needs '{ann}' (torchvision's layout: oxford-iiit-pet/images, "
                                "annotations)")
    try:
        ds = datasets.OxfordIIITPet(parent, split=split, target_types="category", download=False)
    except ValueError as e:  # a line that does not unpack into four fields
        raise BadAnnotationError(f"'{ann}' has a line that is not 'image_id class_id species breed_id' ({e})") from e
    # torchvision keeps the lists private; its __getitem__ would open every image to get a label
    paths, labels = list(ds._images), list(ds._labels)
    names = names or list(ds.classes)
    _check_labels(labels, names, f"'{ann}' (torchvision names only the breeds a split lists)")
    if check_files:
        _check_exist(paths, lambda i: f"in '{ann}'")
    return paths, labels, names


def _voc_parent(root: Path) -> Path | None:
    """The folder holding ``VOCdevkit/VOC2007`` for any of the accepted roots, else None."""
    if (root / "VOCdevkit" / "VOC2007").is_dir():
        return root
    if root.name == "VOCdevkit" and (root / "VOC2007").is_dir():
        return root.parent
    if root.name == "VOC2007" and root.parent.name == "VOCdevkit":
        return root.parent.parent
    return None


def _voc_objects(xml_file: str, index: dict[str, int]) -> list[tuple[int, bool, float]]:
    """``(class index, difficult, box area)`` of each object in a VOC annotation file."""
    try:
        # ElementTree resolves no external entities and (expat >= 2.4.1) limits entity expansion
        tree = ET.parse(xml_file)
    except (ET.ParseError, OSError) as e:
        raise BadAnnotationError(f"cannot read VOC annotation '{xml_file}' ({e}); fix or re-extract it") from e
    objects = []
    for k, obj in enumerate(tree.getroot().findall("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            raise BadAnnotationError(f"object {k} in '{xml_file}' is named {name!r}, not one of the "
                                     f"{len(index)} classes {list(index)}")  # fmt: skip
        box = obj.find("bndbox")
        try:
            xmin, ymin, xmax, ymax = (float(box.findtext(c)) for c in ("xmin", "ymin", "xmax", "ymax"))
            difficult = int((obj.findtext("difficult") or "0").strip()) == 1
        except (AttributeError, TypeError, ValueError):
            raise BadAnnotationError(f"object {k} ({name}) in '{xml_file}' needs a <bndbox> with numeric xmin, ymin, "
                                     "xmax, ymax (and <difficult> 0 or 1)") from None  # fmt: skip
        objects.append((index[name], difficult, max(xmax - xmin, 0.0) * max(ymax - ymin, 0.0)))
    return objects


def _read_voc(
    root: Path, split: str, names: list[str] | None, multilabel: bool, check_files: bool
) -> tuple[list[str], list[int] | Tensor, list[str]]:
    parent = _voc_parent(root)
    if parent is None:
        raise FileNotFoundError(f"no VOC2007 under '{root}': expected '{root}/VOCdevkit/VOC2007', or root to be the "
                                "VOCdevkit folder or VOCdevkit/VOC2007 (torchvision's layout)")  # fmt: skip
    _check_split(split, _TORCHVISION_SPLITS["voc2007"], "voc2007")
    split_file = parent / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"VOC2007 split '{split}' needs '{split_file}' (the test split is a separate archive)")
    ds = datasets.VOCDetection(parent, year="2007", image_set=split, download=False)
    # a blank line in the split file gives torchvision an item named ".jpg"
    pairs = [(im, xml) for im, xml in zip(ds.images, ds.annotations) if os.path.basename(im) != ".jpg"]
    names = names or list(VOC_CLASSES)
    index = {c: i for i, c in enumerate(names)}
    targets: list[int] | Tensor = torch.zeros(len(pairs), len(names)) if multilabel else []
    for i, (_, xml_file) in enumerate(pairs):
        objects = _voc_objects(xml_file, index)
        if multilabel:
            for c, difficult, _ in sorted(objects, key=lambda o: not o[1]):  # difficult first, then overwritten
                targets[i, c] = -1.0 if difficult else 1.0
            continue
        if not objects:
            raise BadAnnotationError(f"'{xml_file}' has no <object>, so it has no single label")
        easy = [o for o in objects if not o[1]] or objects
        targets.append(max(easy, key=lambda o: o[2])[0])  # largest box; ties go to the first in the file
    if check_files:
        _check_exist([Path(im) for im, _ in pairs], lambda i: f"in '{split_file}'")
    return [im for im, _ in pairs], targets, names
