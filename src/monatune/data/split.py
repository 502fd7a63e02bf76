"""``monatune split``: cut DOTA-format images into the patches the release trains and tests on.

The DOTA devkit's split as mmrotate's ``tools/data/dota/split/img_split.py`` does it (the STAR-MMRotate
configs read ``data/split_ss_dota``): for every window size (``size / rate``, gap ``gap / rate``),
windows every ``size - gap`` pixels with the last moved back to the border, those with no more than
``img_rate_thr`` of their area inside the image dropped (unless none passes: then the best ones stay);
per window, the objects whose polygon lies at least ``iof_thr`` inside it (area of the polygon inside
the window over its area, by exact polygon clipping where mmrotate uses shapely), moved by the window's
offset and not clipped, marked difficult ``2`` when cut; a window overhanging a small image is padded
with the padding colour. Patches are ``<id>__<window size>__<x>___<y>.png`` with an ``annfiles/`` text
file each (the rate shows in the window size; patches are not rescaled, as mmrotate's).

Presets: ``ss`` (1024 windows, gap 200, rate 1.0) and ``ms`` (rates 0.5, 1.0, 1.5, gap 500).

The split is resumable: each finished image is recorded in ``out_dir/.split_done`` and skipped when
the command runs again; patches and their files are written beside their place and renamed in, so an
interrupted run leaves no half-written patch. Images are read region by region
(:class:`~monatune.data.large_images.LargeImage`) and split by several processes (``workers``).
"""
from __future__ import annotations

import io
import math
import multiprocessing
import sys
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

__all__ = ["PRESETS", "sliding_windows", "split_images", "SplitSummary"]

PRESETS = {"ss": dict(sizes=(1024,), gaps=(200,), rates=(1.0,)), "ms": dict(sizes=(1024,), gaps=(500,), rates=(0.5, 1.0, 1.5))}
PADDING_RGB = (124, 116, 104)  # mmrotate's padding_value [104, 116, 124], BGR
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

        def starts(length: int) -> list[int]:
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
    """What a split wrote (this run) and what it found already done."""

    images: int = 0
    patches: int = 0
    objects_kept: int = 0
    objects_dropped: int = 0  # objects under the IoF threshold in every window
    already_done: int = 0


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _split_one(task: tuple) -> tuple[str, int, int, int]:
    """Split one image (a top-level function, so worker processes can run it)."""
    image_path, label_path, out_dir, sizes, gaps, rate_threshold, iof_threshold, padding = task
    image_path, out_dir = Path(image_path), Path(out_dir)
    objects = read_labels(label_path)[0] if label_path else []
    polygons = torch.tensor([p for p, *_ in objects], dtype=torch.float64).reshape(-1, 8)
    kept_any = np.zeros(len(objects), bool)
    patches = 0
    with LargeImage(image_path) as image:
        width, height = image.size
        windows = sliding_windows(width, height, sizes, gaps, rate_threshold)
        for x1, y1, x2, y2 in sorted(windows.tolist(), key=lambda w: (w[1], w[0])):  # row bands, for the reader
            iofs = polygon_iof(polygons, (x1, y1, x2, y2)).numpy() if len(objects) else np.zeros(0)
            lines = []
            for k in np.nonzero(iofs >= iof_threshold)[0]:
                kept_any[k] = True
                moved = polygons[k].numpy().astype(np.float32) - np.array([x1, y1] * 4, np.float32)
                difficult = 2 if iofs[k] < 1 else objects[k][2]
                lines.append(" ".join(str(v) for v in moved.tolist()) + f" {objects[k][1]} {difficult}")
            pixels = np.empty((y2 - y1, x2 - x1, 3), np.uint8)
            pixels[:] = padding
            region = image.read(x1, y1, x2, y2)
            pixels[: region.shape[0], : region.shape[1]] = region
            name = f"{image_path.stem}__{x2 - x1}__{x1}___{y1}"
            write_file(out_dir / "images" / f"{name}.png", _png(pixels), sync_directory=False)
            write_file(out_dir / "annfiles" / f"{name}.txt", "".join(f"{line}\n" for line in lines).encode(), sync_directory=False)
            patches += 1
    return image_path.name, patches, int(kept_any.sum()), int((~kept_any).sum())


def _sources(source: Path) -> list[tuple[Path, Path | None]]:
    images = source / "images" if (source / "images").is_dir() else source
    labels = next((source / d for d in ("labelTxt", "annfiles") if (source / d).is_dir()), None)
    if not images.is_dir():
        raise FileNotFoundError(f"'{source}' is not a folder; give a folder with images/ (and labelTxt/ or annfiles/)")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no image ({', '.join(IMAGE_SUFFIXES)}) in '{images}'")
    return [(f, (labels / f"{f.stem}.txt") if labels is not None and (labels / f"{f.stem}.txt").is_file() else None)
            for f in files]  # fmt: skip


def split_images(
    sources: Sequence[str | Path],
    out_dir: str | Path,
    *,
    sizes: Sequence[int] = (1024,),
    gaps: Sequence[int] = (200,),
    rates: Sequence[float] = (1.0,),
    img_rate_thr: float = 0.6,
    iof_thr: float = 0.7,
    padding: tuple[int, int, int] = PADDING_RGB,
    workers: int = 1,
    progress: bool = True,
) -> SplitSummary:
    """Split DOTA-format folders into patches, as mmrotate's ``img_split.py`` (module docstring).

    Args:
        sources: Folders with ``images/`` and ``labelTxt/`` (or ``annfiles/``), or images only (a test set).
        out_dir: Where ``images/``, ``annfiles/`` and the record of finished images go.
        sizes: Window sizes (one, or one per rate).
        gaps: Overlaps, one per size.
        rates: Scales; each turns every size and gap into ``int(size / rate)``, ``int(gap / rate)``.
        img_rate_thr: Windows with no more of their area inside the image than this are dropped.
        iof_thr: Objects at least this much inside a window go into its patch.
        padding: RGB colour of the padding of windows larger than the image.
        workers: Processes splitting images in parallel.
        progress: Show a progress bar.

    Returns:
        A :class:`SplitSummary` of this run.
    """
    if len(sizes) != len(gaps):
        raise ValueError(f"give one gap per window size, got sizes {list(sizes)} and gaps {list(gaps)}")
    if not rates or any(r <= 0 for r in rates) or not 0 <= img_rate_thr < 1 or not 0 < iof_thr <= 1 or workers < 1:
        raise ValueError("rates must be positive, img_rate_thr in [0, 1), iof_thr in (0, 1] and workers >= 1")
    all_sizes = [int(s / r) for r in rates for s in sizes]
    all_gaps = [int(g / r) for r in rates for g in gaps]
    for s, g in zip(all_sizes, all_gaps):
        if not 0 <= g < s:
            raise ValueError(f"window size {s} with gap {g}: the gap must be smaller than the window")
    pairs = [pair for source in sources for pair in _sources(Path(source).expanduser())]
    stems = [image.stem for image, _ in pairs]
    if len(set(stems)) != len(stems):
        raise ValueError("two source images share a name; patch names would collide")
    out_dir = Path(out_dir).expanduser()
    for sub in ("images", "annfiles"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    record = out_dir / _DONE
    done = set(record.read_text().splitlines()) if record.is_file() else set()
    todo = [(str(i), str(a) if a else None, str(out_dir), all_sizes, all_gaps, img_rate_thr, iof_thr, tuple(padding))
            for i, a in pairs if i.name not in done]  # fmt: skip
    summary = SplitSummary(already_done=len(pairs) - len(todo))
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="image", desc="split", file=sys.stderr)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 and len(todo) > 1 else None
    try:
        results = pool.imap_unordered(_split_one, todo) if pool is not None else map(_split_one, todo)
        for name, patches, kept, dropped in results:
            summary.images += 1
            summary.patches += patches
            summary.objects_kept += kept
            summary.objects_dropped += dropped
            done.add(name)
            write_file(record, "".join(f"{n}\n" for n in sorted(done)).encode(), sync_directory=False)
            if bar is not None:
                bar.update()
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    return summary
