"""Reading image files: every image a model or a prediction picture sees is decoded here.

:func:`read_rgb` turns a file into an 8-bit RGB PIL image, scaling 16-bit and float images by
their bit depth (PIL's ``convert("RGB")`` saturates them: 16-bit 50% grey becomes 255).
:func:`open_image` is what the data sets call: it names the file of an unreadable image, or with
``on_bad_image="skip"`` returns a :class:`Skipped` marker that the collate functions turn into
the batch's ``"skipped"`` list of paths.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["ON_BAD_IMAGE", "BadImageError", "Skipped", "read_rgb", "open_image"]

ON_BAD_IMAGE = ("error", "skip")
_SKIP_HINT = "or set data.on_bad_image=skip to skip unreadable images"
# What PIL raises for a missing, unidentified, truncated or otherwise broken file. The transform is
# applied outside the ``try``, so its own errors are never taken for a bad image.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # 32-bit and 16-bit integer grey


class BadImageError(ValueError):
    """An image file is missing or cannot be decoded."""


@dataclass(frozen=True)
class Skipped:
    """What a data set gives for an item whose image was unreadable under ``on_bad_image="skip"``.

    The collate functions drop it from the batch and list ``path`` under the batch's ``"skipped"``.
    """

    path: str


def read_rgb(path: str) -> Image.Image:
    """The image at ``path`` as an 8-bit RGB PIL image, decoded in full.

    Single-channel images deeper than 8 bits are scaled by their bit depth, not saturated:

    - 16-bit (PIL modes ``I;16*``, and mode ``I``, which PIL gives many 16-bit PNGs and TIFFs):
      0..65535 map to 0..255 (divided by 257, rounded). An ``I`` image (32-bit integers) with a
      value outside 0..65535 has no known bit depth and is refused (``ValueError``).
    - float (mode ``F``, e.g. 32-bit float TIFFs): taken to hold 0..1, the common convention;
      multiplied by 255 and rounded. Values outside [0, 1] are clipped (NaN becomes 0), with a
      warning naming the file and its range: it is not rescaled by its own minimum and maximum,
      which would change from image to image.

    Every other mode (``L``, ``LA``, ``P``, ``RGBA``, ``CMYK``, ``1``, ...) goes through PIL's
    ``convert("RGB")``; PIL already opens 16-bit colour PNGs as 8-bit ``RGB``/``RGBA``.

    Raises:
        OSError, ValueError, ...: what PIL raises for a missing, unidentified or truncated file
            (the members of ``_IMAGE_ERRORS``), or ``ValueError`` for an ``I`` image out of range.
    """
    with Image.open(path) as im:
        if im.mode in _INT_MODES:
            values = np.asarray(im).astype(np.int64)  # decodes the whole file, so truncation fails here
            if values.size and (values.min() < 0 or values.max() > 65535):
                raise ValueError(f"it is a mode-{im.mode} image with values {values.min()}..{values.max()}, "
                                 "outside 16 bits (0..65535), so its bit depth is unknown; save it as 8 or 16 bits")
            gray = np.rint(values / 257.0)
        elif im.mode == "F":
            values = np.asarray(im, dtype=np.float64)
            outside = ~((values >= 0.0) & (values <= 1.0))  # NaN counts as outside
            if outside.any():
                finite = values[np.isfinite(values)]
                shown = f"{finite.min():g}..{finite.max():g}" if finite.size else "none finite"
                warnings.warn(f"float image '{path}' has values outside [0, 1] (range {shown}, {int(outside.sum())} "
                              "pixels); float images are read as 0..1, so those pixels were clipped",
                              stacklevel=2)  # fmt: skip
            gray = np.rint(np.nan_to_num(values, nan=0.0).clip(0.0, 1.0) * 255.0)
        else:
            return im.convert("RGB")  # decodes the whole file, so truncation fails here
    return Image.fromarray(gray.astype(np.uint8), mode="L").convert("RGB")


def open_image(path: str, on_bad_image: str, size: tuple[int, int] | None = None) -> Image.Image | Skipped:
    """The RGB image at ``path`` (:func:`read_rgb`); :class:`Skipped` for an unreadable one with ``"skip"``.

    ``size`` (width, height), when given, is what the annotations say; another size counts as unreadable.
    Otherwise an unreadable image raises :class:`BadImageError` naming the file.
    """
    try:
        image = read_rgb(path)
        if size is not None and image.size != size:
            raise ValueError(f"it is {image.width}x{image.height} but its annotations say {size[0]}x{size[1]}")
    except _IMAGE_ERRORS as e:
        if on_bad_image == "skip":
            return Skipped(str(path))
        reason = f"{type(e).__name__}: {e}"
        raise BadImageError(f"cannot read image '{path}' ({reason}); fix or remove it, {_SKIP_HINT}") from e
    return image


def _check_on_bad_image(value: str) -> None:
    if value not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {value!r}")
