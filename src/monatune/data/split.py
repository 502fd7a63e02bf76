"""``monatune split``: cut DOTA-format images into the patches the release trains and tests on.

The DOTA devkit's split as mmrotate's ``tools/data/dota/split/img_split.py`` does it (the STAR-MMRotate
configs read ``data/split_ss_dota``), spec §3.4:

- **Windows**: for every rate and size, a window of ``int(size / rate)`` pixels every
  ``int(size / rate) - int(gap / rate)`` pixels on each axis (one window when the side fits), the last
  moved back to end at the border; windows with no more than ``img_rate_thr`` of their area inside the
  image are dropped, unless none passes: then the best ones stay. The rate only changes the window size;
  patches are **not** rescaled (the original DOTA devkit resizes the image by the rate; mmrotate does
  not), so a rate-0.5 patch is 2048 pixels and is named ``<id>__2048__<x>___<y>``.
- **Objects** per window: those whose polygon lies at least ``iof_thr`` inside the window (area of the
  polygon inside the window over its area, by exact polygon clipping, :func:`monatune.ops.polygon_iof`,
  where mmrotate uses shapely; only polygons whose bounding box overlaps the window with a positive area
  are clipped, as mmrotate's pre-filter), moved by the window's offset and **not** clipped, marked
  difficult ``2`` when cut (IoF under 1), else keeping their flag. Coordinates are float32 and written
  as numpy prints a float32 (``824.0``, ``100.1``), as mmrotate writes them:
  ``x1 y1 ... x4 y4 class difficult``.
- **Patches**: ``<id>__<window size>__<x>___<y><save_ext>`` in ``out_dir/images/`` and an ``.txt``
  file each in ``out_dir/annfiles/`` (empty for a test set, as mmrotate writes them), a window
  overhanging a small image padded bottom/right with ``padding_value`` (mmrotate's BGR 104, 116, 124).
- **Annotations** (``labelTxt/`` or ``annfiles/``): header lines (``imagesource:``, ``gsd:``) and lines
  under 9 fields are skipped, ``difficult`` defaults to 0; classes are not checked unless ``classes`` is
  given; an image without a ``.txt`` has no objects (counted in the summary).

Presets :data:`PRESETS`: ``ss`` (1024 windows, gap 200, rate 1.0) and ``ms`` (rates 0.5, 1.0, 1.5, gap
500), from ``split_configs/{ss,ms}_*.json``.

The split is resumable: each finished image is recorded in ``out_dir/.split_done`` (with the settings,
which a rerun must repeat) and skipped when the command runs again; patches and their files are written
beside their place and renamed in (:func:`monatune.atomic.write_file`), so an interrupted run leaves no
half-written patch under its name. Images are read window row by window row through
:class:`~monatune.data.large_images.LargeImage`, so a PNG scene never needs more than the rows of its
current windows, and split by several processes (``workers``).
"""
from __future__ import annotations

import io
import json
import math
import multiprocessing
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..atomic import write_file
from ..ops import polygon_iof
from .large_images import LargeImage
from .oriented import IMAGE_SUFFIXES, read_labels

__all__ = ["PRESETS", "PADDING_RGB", "SAVE_EXTS", "sliding_windows", "split_images", "SplitSummary"]

PRESETS = {
    "ss": {"sizes": (1024,), "gaps": (200,), "rates": (1.0,)},
    "ms": {"sizes": (1024,), "gaps": (500,), "rates": (0.5, 1.0, 1.5)},
}
PADDING_RGB = (124, 116, 104)  # mmrotate's padding_value [104, 116, 124], BGR
SAVE_EXTS = {".png": ("PNG", {"compress_level": 1}), ".jpg": ("JPEG", {"quality": 95}), ".bmp": ("BMP", {}),
             ".tif": ("TIFF", {})}  # fmt: skip  # PNG level 1 and JPEG 95 are OpenCV's imwrite defaults
_DONE = ".split_done"


def sliding_windows(
    width: int, height: int, size: int | Sequence[int] = 1024, gap: int | Sequence[int] = 200, rate_threshold: float = 0.6
) -> np.ndarray:
    """The release's ``get_sliding_window``: ``[K, 4]`` windows ``x1, y1, x2, y2``, x-major, size by size.

    Starts every ``size - gap`` pixels, the last moved back to end at the border; windows whose in-image
    area is at most ``rate_threshold`` of theirs are dropped, unless none passes: then the best are kept.
    """
    sizes = [size] if isinstance(size, int) else list(size)
    gaps = [gap] if isinstance(gap, int) else list(gap)
    parts = []
    for s, g in zip(sizes, gaps):
        if not 0 <= g < s:
            raise ValueError(f"the window gap must be in [0, size={s}), got {g}")
        step = s - g

        def starts(length: int, s: int = s, step: int = step) -> list[int]:
            n = 1 if length <= s else math.ceil((length - s) / step + 1)
            out = [step * i for i in range(n)]
            if len(out) > 1 and out[-1] + s > length:
                out[-1] = length - s
            return out

        start = np.array([(x, y) for x in starts(width) for y in starts(height)], dtype=np.int64)
        parts.append(np.concatenate([start, start + s], axis=1))
    windows = np.concatenate(parts)
    inside = windows.copy()
    inside[:, 0::2] = np.clip(inside[:, 0::2], 0, width)
    inside[:, 1::2] = np.clip(inside[:, 1::2], 0, height)
    area = (windows[:, 2] - windows[:, 0]) * (windows[:, 3] - windows[:, 1])
    rates = (inside[:, 2] - inside[:, 0]) * (inside[:, 3] - inside[:, 1]) / area
    if not (rates > rate_threshold).any():
        rates[np.abs(rates - rates.max()) < 0.01] = 1
    return windows[rates > rate_threshold]


@dataclass
class SplitSummary:
    """What a split did in this run (``already_done``: images a previous run finished, skipped now)."""

    images: int = 0
    patches: int = 0
    objects_kept: int = 0  # objects in at least one patch
    objects_dropped: int = 0  # objects under the IoF threshold in every window
    objects_other_class: int = 0  # objects of a class not in ``classes`` (when given), left out
    bad_lines: int = 0  # annotation lines that are not ``x1 y1 ... x4 y4 class [difficult]``, skipped
    images_without_labels: int = 0  # images of a labelled folder without their .txt (no objects)
    already_done: int = 0


def _encode(pixels: np.ndarray, save_ext: str) -> bytes:
    kind, options = SAVE_EXTS[save_ext]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind, **options)
    return buffer.getvalue()


def _window_lines(polygons: np.ndarray, names: list[str], difficult: list[int], window: tuple[int, ...],
                  iof_thr: float) -> tuple[list[str], np.ndarray]:  # fmt: skip
    """The annotation lines of one window and which objects it keeps."""
    x1, y1, x2, y2 = window
    boxes = polygons.reshape(-1, 4, 2)
    low, high = boxes.min(1), boxes.max(1)
    overlap_x = np.minimum(high[:, 0], x2) > np.maximum(low[:, 0], x1)
    overlap = overlap_x & (np.minimum(high[:, 1], y2) > np.maximum(low[:, 1], y1))  # a positive area in common
    iofs = np.zeros(len(polygons))
    candidates = np.nonzero(overlap)[0]
    if len(candidates):
        iofs[candidates] = polygon_iof(torch.from_numpy(polygons[candidates].astype(np.float64)), window).numpy()
    keep = iofs >= iof_thr
    lines = []
    for k in np.nonzero(keep)[0]:
        moved = polygons[k] + np.array([-x1, -y1] * 4, np.float32)  # float32, as mmrotate's translate
        flag = 2 if iofs[k] < 1 else difficult[k]
        lines.append(" ".join(map(str, moved)) + f" {names[k]} {flag}\n")  # str(np.float32): 824.0, 100.1
    return lines, keep


def _split_one(task: dict) -> dict:
    """Split one image (a top-level function, so worker processes can run it)."""
    image_path, out_dir = Path(task["image"]), Path(task["out_dir"])
    objects, problems = read_labels(task["labels"]) if task["labels"] else ([], [])
    classes = task["classes"]
    known = [o for o in objects if classes is None or o[1] in classes]
    polygons = np.array([p for p, *_ in known], np.float32).reshape(-1, 8)  # float32, as mmrotate parses them
    names, difficult = [o[1] for o in known], [o[2] for o in known]
    kept = np.zeros(len(known), bool)
    patches = 0
    with LargeImage(image_path) as image:
        windows = sliding_windows(*image.size, task["sizes"], task["gaps"], task["img_rate_thr"])
        for x1, y1, x2, y2 in sorted(windows.tolist(), key=lambda w: (w[1], w[0])):  # down the image, for the reader
            lines, keep = _window_lines(polygons, names, difficult, (x1, y1, x2, y2), task["iof_thr"])
            kept |= keep
            region = image.read(x1, y1, x2, y2)
            if region.shape[:2] != (y2 - y1, x2 - x1):  # a window overhanging a small image
                pixels = np.empty((y2 - y1, x2 - x1, 3), np.uint8)
                pixels[:] = task["padding_value"]
                pixels[: region.shape[0], : region.shape[1]] = region
                region = pixels
            name = f"{image_path.stem}__{x2 - x1}__{x1}___{y1}"
            patch = _encode(region, task["save_ext"])
            write_file(out_dir / "images" / f"{name}{task['save_ext']}", patch, sync_directory=False)
            write_file(out_dir / "annfiles" / f"{name}.txt", "".join(lines).encode(), sync_directory=False)
            patches += 1
    return {"name": image_path.name, "patches": patches, "kept": int(kept.sum()), "dropped": int((~kept).sum()),
            "other_class": len(objects) - len(known), "problems": problems}  # fmt: skip


def _worker_init() -> None:
    torch.set_num_threads(1)  # the processes are the parallelism


def _source_images(source: Path) -> list[tuple[Path, Path | None, bool]]:
    """``(image, its .txt or None, whether the folder has labels)`` for a source folder."""
    source = source.expanduser()
    if (source / "images").is_dir():
        root, images = source, source / "images"
    elif source.is_dir():  # the images/ folder itself, or a folder of images (a test set)
        root, images = source.parent, source
    else:
        raise FileNotFoundError(f"'{source}' is not a folder; give a folder with images/ (and labelTxt/ or annfiles/)")
    labels = next((root / d for d in ("labelTxt", "annfiles") if (root / d).is_dir()), None)
    if images == source and source.name != "images":
        labels = None  # a bare folder of images: no labels are looked for beside it
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no image ({', '.join(IMAGE_SUFFIXES)}) in '{images}'")
    out = []
    for f in files:
        txt = labels / f"{f.stem}.txt" if labels is not None else None
        out.append((f, txt if txt is not None and txt.is_file() else None, labels is not None))
    return out


def split_images(
    sources: Sequence[str | Path] | str | Path,
    out_dir: str | Path,
    *,
    sizes: Sequence[int] = (1024,),
    gaps: Sequence[int] = (200,),
    rates: Sequence[float] = (1.0,),
    img_rate_thr: float = 0.6,
    iof_thr: float = 0.7,
    padding_value: Sequence[int] = PADDING_RGB,
    save_ext: str = ".png",
    workers: int = 1,
    progress: bool = True,
    classes: Sequence[str] | None = None,
) -> SplitSummary:
    """Split DOTA-format folders into patches, as mmrotate's ``img_split.py`` (module docstring).

    Args:
        sources: Folders with ``images/`` and ``labelTxt/`` (or ``annfiles/``), or images only (a test set).
        out_dir: Where ``images/``, ``annfiles/`` and the record of finished images go.
        sizes: Window sizes.
        gaps: Overlaps, one per size.
        rates: Scales; each turns every size and gap into ``int(size / rate)``, ``int(gap / rate)``.
        img_rate_thr: Windows with no more of their area inside the image than this are dropped.
        iof_thr: Objects at least this much inside a window go into its patch.
        padding_value: RGB colour of the padding of windows larger than the image.
        save_ext: Patch format: ``.png``, ``.jpg``, ``.bmp`` or ``.tif``.
        workers: Processes splitting images in parallel.
        progress: Show a progress bar (stderr).
        classes: Keep only objects of these classes (default: every class, as mmrotate).

    Returns:
        A :class:`SplitSummary` of this run.

    Example:
        >>> split_images(["data/DOTA/train", "data/DOTA/val"], "data/split_ss_dota/trainval", workers=8)
        >>> split_images(["data/DOTA/train"], "data/split_ms_dota/train", **PRESETS["ms"])
    """
    sizes, gaps, rates = [int(s) for s in sizes], [int(g) for g in gaps], [float(r) for r in rates]
    if not sizes or len(sizes) != len(gaps):
        raise ValueError(f"give one gap per window size, got sizes {sizes} and gaps {gaps}")
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"rates must be positive numbers, got {rates}")
    if not 0 <= img_rate_thr <= 1 or not 0 <= iof_thr <= 1:
        raise ValueError(f"img_rate_thr and iof_thr must be in [0, 1], got {img_rate_thr} and {iof_thr}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if save_ext not in SAVE_EXTS:
        raise ValueError(f"save_ext must be one of {', '.join(SAVE_EXTS)}, got {save_ext!r}")
    padding = tuple(int(v) for v in padding_value)
    if len(padding) == 1:
        padding *= 3
    if len(padding) != 3 or not all(0 <= v <= 255 for v in padding):
        raise ValueError(f"padding_value must be an RGB colour (three 0..255 values), got {list(padding_value)}")
    all_sizes = [int(s / r) for r in rates for s in sizes]
    all_gaps = [int(g / r) for r in rates for g in gaps]
    for s, g in zip(all_sizes, all_gaps):
        if not 0 <= g < s:
            raise ValueError(f"window size {s} with gap {g} (size / rate, gap / rate): the gap must be in [0, size)")
    if isinstance(sources, (str, Path)):
        sources = [sources]
    images = [item for source in sources for item in _source_images(Path(source))]
    stems = sorted(image.stem for image, _, _ in images)
    twice = sorted({a for a, b in zip(stems, stems[1:]) if a == b})
    if twice:
        raise ValueError(f"source images share names ({', '.join(twice[:5])}); patch names would collide")

    out_dir = Path(out_dir).expanduser()
    img_rate_thr, iof_thr = float(img_rate_thr), float(iof_thr)
    settings = {"sizes": all_sizes, "gaps": all_gaps, "img_rate_thr": img_rate_thr, "iof_thr": iof_thr,
                "padding_rgb": list(padding), "save_ext": save_ext,
                "classes": None if classes is None else list(classes)}  # fmt: skip
    done = _read_record(out_dir / _DONE, settings)
    for sub in ("images", "annfiles"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
        for stale in (out_dir / sub).glob(".*.tmp"):  # a killed run's unfinished patch
            stale.unlink(missing_ok=True)
    base = {"out_dir": str(out_dir), "sizes": all_sizes, "gaps": all_gaps, "img_rate_thr": img_rate_thr,
            "iof_thr": iof_thr, "padding_value": padding, "save_ext": save_ext,
            "classes": None if classes is None else set(classes)}  # fmt: skip
    todo = [{**base, "image": str(i), "labels": str(t) if t else None} for i, t, _ in images if i.name not in done]
    summary = SplitSummary(already_done=len(images) - len(todo))
    summary.images_without_labels = sum(1 for i, t, labelled in images if labelled and t is None and i.name not in done)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="image", desc="split", file=sys.stderr)
    pool = None
    if workers > 1 and len(todo) > 1:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            context.set_forkserver_preload([__name__])  # imported once, then forked per worker
        pool = context.Pool(min(workers, len(todo)), initializer=_worker_init)
    problems: list[str] = []
    try:
        results = pool.imap_unordered(_split_one, todo) if pool is not None else map(_split_one, todo)
        for result in results:
            summary.images += 1
            summary.patches += result["patches"]
            summary.objects_kept += result["kept"]
            summary.objects_dropped += result["dropped"]
            summary.objects_other_class += result["other_class"]
            summary.bad_lines += len(result["problems"])
            problems += result["problems"][: 5 - len(problems)]
            done.add(result["name"])
            _write_record(out_dir / _DONE, settings, done)
            if bar is not None:
                bar.update()
                bar.set_postfix(patches=summary.patches)
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    if problems:
        warnings.warn(f"skipped {summary.bad_lines} annotation line(s) that are not 'x1 y1 ... x4 y4 class "
                      f"[difficult]', e.g.:\n  " + "\n  ".join(problems), stacklevel=2)  # fmt: skip
    return summary


def _read_record(path: Path, settings: dict) -> set[str]:
    """The images a previous run finished; a record made with other settings is refused."""
    if not path.is_file():
        return set()
    first, *names = path.read_text().splitlines()
    recorded = json.loads(first) if first.startswith("{") else None
    if recorded != settings:
        raise ValueError(f"'{path.parent}' holds a split made with other settings ({first}); the patches would "
                         f"mix. Use another output folder, or delete this one, to split with "
                         f"{json.dumps(settings)}")  # fmt: skip
    return set(names)


def _write_record(path: Path, settings: dict, done: set[str]) -> None:
    text = json.dumps(settings) + "\n" + "".join(f"{n}\n" for n in sorted(done))
    write_file(path, text.encode(), sync_directory=False)
