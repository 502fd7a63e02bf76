"""Reading regions of very large remote-sensing images (STAR scenes reach 27,860 x 31,096 pixels).

:class:`LargeImage` gives an image's size from its header and any region as RGB uint8. Pillow refuses
images over ``Image.MAX_IMAGE_PIXELS`` (about 179 megapixels) as possible decompression bombs; these are
local data sets, so the limit is lifted for these reads only. Pillow has no region decoding of its own
(``crop`` decodes the whole file first), so how much is decoded, and held, depends on the format:

- **8-bit PNG**, not interlaced (grey, grey + alpha, RGB, RGBA, palette): the format of DOTA and STAR.
  The compressed stream is inflated incrementally (``zlib``, at most one band of rows ahead) and each
  band of rows (about 1 MiB of samples) is decoded by Pillow from a small PNG made of the previous row
  (unfiltered) and the band's rows as they are filtered in the file. Held: the decoded rows from the
  band holding the request's first row to its last row (3 bytes a pixel), plus one band being decoded.
  Reads must go down the image (windows visited row band by row band, as :mod:`monatune.data.split`
  and the sliding-window inference do); going back above the held rows starts again from the top of
  the file. A 1,024-row window band of a 31,096-pixel-wide scene holds about 95 MB, the whole scene
  2.6 GB.
- **Uncompressed rasters** whose Pillow tiles are all ``raw`` (uncompressed TIFF in strips or tiles,
  BMP, PPM, uncompressed TGA), at 8 bits or more a pixel and not 16-bit/float: only the requested
  rectangle is read from the file (each tile's rows and columns by their byte offsets); nothing is held
  between reads.
- **Everything else** (JPEG, compressed TIFF, 16-bit, float, sub-8-bit or interlaced PNG, ...): decoded
  whole once, on the first read, and held as a Pillow RGB image (4 bytes a pixel; about 8 while a
  non-RGB image is converted), with :func:`~monatune.data.images.read_rgb`'s scaling of 16-bit and
  float pixels. libjpeg decodes sequentially into one image that Pillow allocates whole, and Pillow
  hands compressed TIFFs to libtiff as one tile, so nothing smaller was found for these.
"""
from __future__ import annotations

import copy
import io
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageFile

from .images import _INT_MODES, BadImageError, read_rgb

__all__ = ["LargeImage", "unlimited_pixels"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
_BAND_BYTES = 1 << 20  # decoded PNG samples per band
_ORIENTATION = 274  # TIFF/EXIF orientation tag; Pillow turns TIFFs by it on load
_tile = getattr(ImageFile, "_Tile", lambda *fields: tuple(fields))  # a named tuple from Pillow 11
_ERRORS = (OSError, ValueError, EOFError, SyntaxError, zlib.error, struct.error, Image.DecompressionBombError)


@contextmanager
def unlimited_pixels() -> Iterator[None]:
    """Lift Pillow's decompression-bomb limit for the reads inside the block."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF
    return b"".join([struct.pack(">I", len(data)), kind, data, struct.pack(">I", crc)])


class _PNGRows:
    """Rows of an 8-bit non-interlaced PNG, decoded in order, a band at a time."""

    def __init__(self, path: Path) -> None:
        self.file: BinaryIO = open(path, "rb")
        try:
            self._read_header()
        except BaseException:
            self.file.close()
            raise
        self.row_bytes = 1 + self.width * _CHANNELS[self.colour]  # filter byte + samples
        self.band = max(1, min(self.height, _BAND_BYTES // self.row_bytes))
        self.inflate = zlib.decompressobj()
        self.pending = bytearray()  # inflated (still filtered) bytes not yet decoded
        self.next_row = 0
        self.previous: bytes | None = None  # the last decoded row, unfiltered (PNG sample bytes)

    def _read_header(self) -> None:
        if self.file.read(8) != _PNG_SIGNATURE:
            raise ValueError("not a PNG")
        self.extra = b""  # PLTE and tRNS chunks, copied into every band's PNG
        while True:
            length, kind = struct.unpack(">I4s", self.file.read(8))
            if kind == b"IDAT":
                self.chunk_left = length
                return
            data = self.file.read(length)
            self.file.read(4)
            if kind == b"IHDR":
                self.width, self.height, depth, self.colour, _, _, interlace = struct.unpack(">IIBBBBB", data)
                if depth != 8 or interlace or self.colour not in _CHANNELS:
                    raise ValueError("not an 8-bit non-interlaced PNG")
                self.ihdr = data
            elif kind in (b"PLTE", b"tRNS"):
                self.extra += _chunk(kind, data)

    def _compressed(self, size: int = 1 << 18) -> bytes:
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

    def rows(self) -> np.ndarray:
        """The next band of rows, RGB ``[rows, W, 3]``."""
        count = min(self.band, self.height - self.next_row)
        need = count * self.row_bytes
        while len(self.pending) < need:  # inflate no more than needed: a flat image inflates 1000-fold
            data = self.inflate.unconsumed_tail or self._compressed()
            if not data:
                raise ValueError(f"the image data ends at row {self.next_row + len(self.pending) // self.row_bytes}")
            self.pending += self.inflate.decompress(data, need - len(self.pending))
        store = zlib.compressobj(0)  # the band's PNG stream, stored (not compressed)
        parts = [] if self.previous is None else [store.compress(b"\x00" + self.previous)]
        with memoryview(self.pending) as view:
            parts.append(store.compress(view[:need]))
        parts.append(store.flush())
        del self.pending[:need]
        lead = 0 if self.previous is None else 1
        header = struct.pack(">II", self.width, count + lead) + self.ihdr[8:]
        band = b"".join([_PNG_SIGNATURE, _chunk(b"IHDR", header), self.extra, _chunk(b"IDAT", b"".join(parts))])
        del parts
        image = Image.open(io.BytesIO(band + _chunk(b"IEND", b"")))
        del band
        image.load()
        self.previous = image.crop((0, count + lead - 1, self.width, count + lead)).tobytes()
        self.next_row += count
        return _rgb(image)[lead:]

    def close(self) -> None:
        self.file.close()


class _Region(ImageFile.ImageFile):
    """A rectangle of an uncompressed raster: Pillow's own ``raw`` tiles, cut to the rectangle.

    Written as an image plugin (``_open`` sets mode, size and tiles), Pillow's documented way to decode
    a file it does not know; the source image's palette is carried over.
    """

    format = "REGION"
    format_description = "a rectangle of a raw raster"

    def __init__(self, fp: BinaryIO, mode: str, size: tuple[int, int], tiles: list, palette: Any) -> None:
        self._spec = (mode, size, tiles, palette)
        super().__init__(fp)

    def _open(self) -> None:
        mode, size, tiles, palette = self._spec
        self._mode, self._size, self.tile = mode, size, tiles
        if not isinstance(getattr(Image.Image, "mode", None), property):  # Pillow 10.0 has a plain attribute
            self.mode = mode
        if palette is not None:
            self.palette = copy.copy(palette)


def _raw_tiles(image: Image.Image) -> list[tuple[tuple[int, int, int, int], int, str, int, int, int]] | None:
    """``(extents, offset, rawmode, stride, ystep, bytes per pixel)`` of each tile, or None when a tile is
    not ``raw`` or its pixels are not whole bytes (then the image is decoded whole)."""
    if image.mode in _INT_MODES or image.mode == "F" or not image.tile:
        return None
    tiles = []
    for tile in image.tile:
        if tile.codec_name != "raw":
            return None
        args = tile.args if isinstance(tile.args, tuple) else (tile.args,)
        if len(args) > 3:
            return None
        rawmode, stride, ystep = (args + (0, 1)[len(args) - 1 :])[:3]
        x0, y0, x1, y1 = tile.extents
        try:  # Pillow's packer for the raw mode: the bytes of 8 pixels are the bits of one
            bits = len(Image.new(image.mode, (8, 1)).tobytes("raw", rawmode))
        except (ValueError, OSError):
            return None
        if bits % 8 or ystep not in (1, -1):
            return None
        tiles.append(((x0, y0, x1, y1), tile.offset, rawmode, stride or (x1 - x0) * bits // 8, ystep, bits // 8))
    return tiles


class LargeImage:
    """An image read region by region; use it as a context manager (module docstring: memory per format).

    Args:
        path: The image file.

    Attributes:
        size: ``(W, H)``, from the header.
        strategy: ``"png-bands"``, ``"raw-region"`` or ``"whole"`` (module docstring).

    Raises:
        BadImageError: The file is missing or not an image (here), or cannot be decoded (in :meth:`read`).

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
                self._mode, self._palette = probe.mode, probe.palette
                self._tiles = _raw_tiles(probe)
                turn = getattr(probe, "tag_v2", {}).get(_ORIENTATION, 1) if self.format == "TIFF" else 1
        except _ERRORS as e:
            raise BadImageError(f"cannot read image '{self.path}' ({type(e).__name__}: {e})") from None
        if turn in (5, 6, 7, 8):  # Pillow turns such a TIFF a quarter on load
            self.size = self.size[::-1]
        self._png: _PNGRows | None = None
        self._whole: Image.Image | None = None
        self._bands: list[np.ndarray] = []  # decoded PNG rows from self._top down, band by band
        self._top = 0
        if self.format == "PNG" and self._open_png() is not None:
            self.strategy = "png-bands"
        elif self._tiles is not None and turn == 1:
            self.strategy = "raw-region"
        else:
            self.strategy = "whole"

    @property
    def streaming(self) -> bool:
        """Whether regions are read without decoding the whole image."""
        return self.strategy != "whole"

    def _open_png(self) -> _PNGRows | None:
        if self._png is not None:
            self._png.close()
        try:
            self._png = _PNGRows(self.path)
        except (ValueError, OSError, struct.error):
            self._png = None
        self._bands, self._top = [], 0
        return self._png

    def __enter__(self) -> LargeImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free what is held (a closed image can still be read: it opens again)."""
        if self._png is not None:
            self._png.close()
            self._png = None
        if self._whole is not None:
            self._whole.close()
        self._whole, self._bands, self._top = None, [], 0

    def read(self, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
        """The region ``[y1, y2) x [x1, x2)``, clipped to the image, as a new uint8 ``[h, w, 3]`` RGB array.

        Raises:
            BadImageError: The file cannot be decoded (truncated, damaged), naming it.
        """
        width, height = self.size
        x1, y1, x2, y2 = max(0, int(x1)), max(0, int(y1)), min(width, int(x2)), min(height, int(y2))
        if x2 <= x1 or y2 <= y1:
            return np.zeros((max(0, y2 - y1), max(0, x2 - x1), 3), np.uint8)
        try:
            if self.strategy == "png-bands":
                return self._from_bands(x1, y1, x2, y2)
            if self.strategy == "raw-region":
                return self._raw_region(x1, y1, x2, y2)
            if self._whole is None:
                with unlimited_pixels():
                    self._whole = self._decode_whole()
            return np.asarray(self._whole.crop((x1, y1, x2, y2)))
        except _ERRORS as e:
            raise BadImageError(f"cannot read rows {y1}..{y2} of '{self.path}' ({type(e).__name__}: {e})") from None

    def _decode_whole(self) -> Image.Image:
        image = Image.open(self.path)
        try:
            if image.mode in _INT_MODES or image.mode == "F":
                image.close()
                return read_rgb(str(self.path))  # scaled by bit depth
            image.load()
            if image.mode == "RGB":
                return image  # no converted copy: the decoded image is all that is held
            rgb = image.convert("RGB")
        except BaseException:
            image.close()
            raise
        image.close()
        return rgb

    def _from_bands(self, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
        """Rows ``[y1, y2)`` from the held bands, decoding further down as needed."""
        # above the held rows (or closed): start again from the top of the file
        if (self._png is None or y1 < self._top) and self._open_png() is None:
            raise ValueError("its PNG header can no longer be read")
        png = self._png
        while self._bands and self._top + len(self._bands[0]) <= y1:  # bands above the request
            self._top += len(self._bands.pop(0))
        while png.next_row < y2:
            band = png.rows()
            if png.next_row <= y1:  # entirely above the request
                self._top = png.next_row
                continue
            self._bands.append(band)
        parts, top = [], self._top
        for band in self._bands:
            a, b = max(y1, top), min(y2, top + len(band))
            if a < b:
                parts.append(band[a - top : b - top, x1:x2])
            top += len(band)
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()

    def _raw_region(self, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
        """The rectangle read straight from the file, tile by tile."""
        assert self._tiles is not None
        cut = []
        for (tx0, ty0, tx1, ty1), offset, rawmode, stride, ystep, per_pixel in self._tiles:
            a, b, c, d = max(tx0, x1), max(ty0, y1), min(tx1, x2), min(ty1, y2)
            if a >= c or b >= d:
                continue
            first = (b - ty0) if ystep == 1 else (ty1 - d)  # the first row of the cut in the file
            start = offset + first * stride + (a - tx0) * per_pixel
            cut.append(_tile("raw", (a - x1, b - y1, c - x1, d - y1), start, (rawmode, stride, ystep)))
        with open(self.path, "rb") as f, _Region(f, self._mode, (x2 - x1, y2 - y1), cut, self._palette) as region:
            return _rgb(region).copy()
