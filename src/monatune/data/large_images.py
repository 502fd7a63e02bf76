"""Reading regions of very large remote-sensing images (STAR scenes reach 27,860 x 31,096 pixels).

:class:`LargeImage` gives an image's size from its header and any region as RGB uint8, reading
rows in order so that sliding windows visited band by band hold only the rows they need:

- **8-bit PNG** (grey, grey + alpha, RGB, RGBA, palette; not interlaced), the format of DOTA and
  STAR: the compressed stream is inflated incrementally (``zlib``) and each band of rows is
  decoded by Pillow from a small PNG made of the previous row (unfiltered) and the band's rows
  as they are filtered in the file. At most the rows of the current request plus one band are
  held decoded: a 1,024-row window band of a 31,096-pixel-wide scene is about 95 MB, against
  2.6 GB for the whole scene. Going back above the held rows restarts from the top of the file.
- **Everything else** (JPEG, TIFF, 16-bit or interlaced PNG, ...): Pillow decodes the whole
  image once and keeps it (``read_rgb``'s scaling of 16-bit and float pixels applies). Pillow
  cannot decode a region of these formats without decoding what comes before it.

Pillow refuses images over ``Image.MAX_IMAGE_PIXELS`` (about 179 megapixels) as possible
decompression bombs; these are local data sets, so the limit is lifted for these reads only.
"""
from __future__ import annotations

import io
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
from PIL import Image

from .images import BadImageError

__all__ = ["LargeImage", "unlimited_pixels"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
_BAND = 256  # rows decoded per step


@contextmanager
def unlimited_pixels() -> Iterator[None]:
    """Lift Pillow's decompression-bomb limit for the reads inside the block."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


class _PNGRows:
    """Rows of an 8-bit non-interlaced PNG, decoded in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: BinaryIO = open(path, "rb")
        if self.file.read(8) != _PNG_SIGNATURE:
            raise ValueError("not a PNG")
        self.extra = b""  # PLTE and tRNS chunks, copied into every band's PNG
        while True:
            length, kind = struct.unpack(">I4s", self.file.read(8))
            if kind == b"IDAT":
                self.chunk_left = length
                break
            data = self.file.read(length)
            self.file.read(4)
            if kind == b"IHDR":
                self.width, self.height, depth, self.colour, _, _, interlace = struct.unpack(">IIBBBBB", data)
                if depth != 8 or interlace or self.colour not in _CHANNELS:
                    raise ValueError("not an 8-bit non-interlaced PNG")
                self.ihdr = data
            elif kind in (b"PLTE", b"tRNS"):
                self.extra += _chunk(kind, data)
        self.row_bytes = 1 + self.width * _CHANNELS[self.colour]
        self.inflate = zlib.decompressobj()
        self.pending = b""  # inflated bytes not yet decoded
        self.next_row = 0
        self.previous: bytes | None = None  # the last decoded row, unfiltered (PNG sample bytes)

    def _compressed(self, size: int = 1 << 20) -> bytes:
        """The next compressed bytes of the IDAT stream (b"" at its end)."""
        while self.chunk_left == 0:
            self.file.read(4)  # CRC
            header = self.file.read(8)
            if len(header) < 8:
                return b""
            length, kind = struct.unpack(">I4s", header)
            if kind != b"IDAT":
                return b""
            self.chunk_left = length
        data = self.file.read(min(size, self.chunk_left))
        if not data:
            raise ValueError("the file ends inside its image data")
        self.chunk_left -= len(data)
        return data

    def rows(self, count: int) -> Image.Image:
        """The next ``count`` rows as a Pillow image."""
        need = count * self.row_bytes
        while len(self.pending) < need:
            data = self._compressed()
            if not data:
                raise ValueError(f"the image data ends at row {self.next_row + len(self.pending) // self.row_bytes}")
            self.pending += self.inflate.decompress(data)
        filtered, self.pending = self.pending[:need], self.pending[need:]
        lead = b"" if self.previous is None else b"\x00" + self.previous
        header = struct.pack(">II", self.width, count + (1 if lead else 0)) + self.ihdr[8:]
        band = _PNG_SIGNATURE + _chunk(b"IHDR", header) + self.extra
        band += _chunk(b"IDAT", zlib.compress(lead + filtered, 0)) + _chunk(b"IEND", b"")
        image = Image.open(io.BytesIO(band))
        image.load()
        if lead:
            image = image.crop((0, 1, self.width, count + 1))
        self.previous = image.crop((0, count - 1, self.width, count)).tobytes()
        self.next_row += count
        return image

    def close(self) -> None:
        self.file.close()


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


class LargeImage:
    """An image read region by region; use it as a context manager.

    Args:
        path: The image file.

    Example:
        >>> with LargeImage("STAR/test/images/P0001.png") as image:
        ...     width, height = image.size
        ...     window = image.read(0, 0, 1024, 1024)  # uint8 [1024, 1024, 3] RGB
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BadImageError(f"image '{self.path}' does not exist")
        try:
            with unlimited_pixels(), Image.open(self.path) as probe:
                self.size: tuple[int, int] = probe.size  # (W, H)
                self.format = probe.format
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise BadImageError(f"cannot read image '{self.path}' ({type(e).__name__}: {e})") from None
        self._png: _PNGRows | None = None
        self._whole: np.ndarray | None = None
        self._rows = np.zeros((0, self.size[0], 3), np.uint8)  # decoded rows [self._top, self._top + len)
        self._top = 0
        self.streaming = self.format == "PNG" and self._open_png() is not None

    def _open_png(self) -> _PNGRows | None:
        if self._png is not None:
            self._png.close()
        try:
            self._png = _PNGRows(self.path)
        except (ValueError, OSError, struct.error):
            self._png = None
        self._rows, self._top = np.zeros((0, self.size[0], 3), np.uint8), 0
        return self._png

    def __enter__(self) -> "LargeImage":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._png is not None:
            self._png.close()
            self._png = None
        self._whole = None
        self._rows = np.zeros((0, self.size[0], 3), np.uint8)

    def read(self, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
        """The region ``[y1, y2) x [x1, x2)`` as uint8 ``[y2 - y1, x2 - x1, 3]`` RGB (clipped to the image)."""
        width, height = self.size
        x1, y1, x2, y2 = max(0, int(x1)), max(0, int(y1)), min(width, int(x2)), min(height, int(y2))
        if x2 <= x1 or y2 <= y1:
            return np.zeros((max(0, y2 - y1), max(0, x2 - x1), 3), np.uint8)
        try:
            if not self.streaming:
                return self._whole_image()[y1:y2, x1:x2]
            return self._streamed(y1, y2)[:, x1:x2]
        except (OSError, ValueError, zlib.error) as e:
            raise BadImageError(f"cannot read rows {y1}..{y2} of '{self.path}' ({type(e).__name__}: {e})") from None

    def _whole_image(self) -> np.ndarray:
        if self._whole is None:
            from .images import read_rgb

            with unlimited_pixels():
                self._whole = np.asarray(read_rgb(self.path))
        return self._whole

    def _streamed(self, y1: int, y2: int) -> np.ndarray:
        """Rows ``[y1, y2)``; held rows always run from ``self._top`` to the decoder's next row."""
        if y1 < self._top:  # above the held rows: start again from the top of the file
            self._open_png()
        png = self._png
        assert png is not None
        drop = min(max(0, y1 - self._top), len(self._rows))  # rows above the request are not needed again
        self._rows, self._top = self._rows[drop:], self._top + drop
        parts = [self._rows]
        while png.next_row < y2:
            first = png.next_row
            band = _rgb(png.rows(min(_BAND, self.size[1] - first)))
            if png.next_row <= y1:  # entirely above the request
                self._top = png.next_row
                continue
            if first < y1:
                band, self._top = band[y1 - first :], y1
            parts.append(band)
        self._rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return self._rows[y1 - self._top : y2 - self._top]
