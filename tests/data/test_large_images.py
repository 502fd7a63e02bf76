"""Region reads of large images (monatune.data.large_images): every strategy equals a full decode's crop."""
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import monatune
from monatune.data import large_images
from monatune.data.images import BadImageError
from monatune.data.large_images import LargeImage

REGIONS = [(0, 0, 700, 300), (10, 200, 500, 900), (100, 880, 700, 1100), (0, 0, 50, 50), (3, 5, 9, 12),
           (0, 1000, 700, 1100), (-5, -5, 20, 20), (690, 1090, 800, 1200), (0, 0, 700, 1100)]  # fmt: skip


def picture(seed=0, shape=(1100, 700)):
    a = np.random.default_rng(seed).integers(0, 255, (*shape, 3)).astype(np.uint8)
    a[::5] //= 3  # rows and columns that make the PNG filters differ from row to row
    a[:, ::3] = 7
    return a


def crop(full, x1, y1, x2, y2):
    return full[max(0, y1) : max(0, y2), max(0, x1) : max(0, x2)]


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA"])
def test_png_bands_equal_a_full_decode(tmp_path, mode, monkeypatch):
    monkeypatch.setattr(large_images, "_BAND_BYTES", 40_000)  # bands of 19 (RGB) to 57 (grey) rows
    image = Image.fromarray(picture()).convert(mode)
    image.save(tmp_path / "a.png")
    full = np.asarray(image.convert("RGB"))
    with LargeImage(tmp_path / "a.png") as large:
        assert large.strategy == "png-bands" and large.size == (700, 1100)
        for x1, y1, x2, y2 in REGIONS:  # in any order: going back restarts from the top
            assert np.array_equal(large.read(x1, y1, x2, y2), crop(full, x1, y1, x2, y2)), (x1, y1, x2, y2)
        for y in range(0, 1100, 83):  # windows going down, as the split reads them
            for x1, x2 in ((0, 400), (300, 700)):
                assert np.array_equal(large.read(x1, y, x2, y + 120), crop(full, x1, y, x2, y + 120)), (x1, y)


def write_tiled_tiff(path, array, tile=16):
    """A baseline RGB TIFF in uncompressed ``tile`` x ``tile`` tiles (Pillow cannot write tiles)."""
    h, w = array.shape[:2]
    across, down = -(-w // tile), -(-h // tile)
    padded = np.zeros((down * tile, across * tile, 3), np.uint8)
    padded[:h, :w] = array
    data = b"".join(padded[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile].tobytes()
                    for r in range(down) for c in range(across))  # fmt: skip
    n, size = across * down, tile * tile * 3
    bps_at = 8 + len(data)
    offsets_at, counts_at, ifd_at = bps_at + 6, bps_at + 6 + 4 * n, bps_at + 6 + 8 * n
    short, long_ = 3, 4
    entries = [(256, long_, 1, w), (257, long_, 1, h), (258, short, 3, bps_at), (259, short, 1, 1), (262, short, 1, 2),
               (277, short, 1, 3), (284, short, 1, 1), (322, long_, 1, tile), (323, long_, 1, tile),
               (324, long_, n, offsets_at), (325, long_, n, counts_at)]  # fmt: skip
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHIHH", t, k, c, v, 0) if k == short and c == 1 else struct.pack("<HHII", t, k, c, v)
        for t, k, c, v in entries
    )
    Path(path).write_bytes(b"II*\0" + struct.pack("<I", ifd_at) + data + struct.pack("<3H", 8, 8, 8)
                           + struct.pack(f"<{n}I", *(8 + i * size for i in range(n)))
                           + struct.pack(f"<{n}I", *([size] * n)) + ifd + struct.pack("<I", 0))  # fmt: skip


@pytest.mark.parametrize(
    "name, save, strategy",
    [
        ("a.tif", {}, "raw-region"),  # uncompressed strips
        ("g.tif", {"mode": "L"}, "raw-region"),
        ("a.bmp", {}, "raw-region"),  # rows stored bottom up, padded to 4 bytes
        ("p.bmp", {"mode": "P"}, "raw-region"),
        ("a.ppm", {}, "raw-region"),
        ("tiles.tif", {"tiled": True}, "raw-region"),  # 16 x 16 tiles, partial ones at the right and bottom
        ("z.tif", {"compression": "tiff_deflate"}, "whole"),
        ("a.jpg", {"quality": 90}, "whole"),
    ],
)
def test_other_formats_equal_a_full_decode(tmp_path, name, save, strategy):
    array = picture(1, (301, 203))
    path = tmp_path / name
    if save.pop("tiled", False):
        write_tiled_tiff(path, array)
    else:
        Image.fromarray(array).convert(save.pop("mode", "RGB")).save(path, **save)
    full = np.asarray(Image.open(path).convert("RGB"))
    with LargeImage(path) as large:
        assert large.strategy == strategy and large.size == (203, 301)
        for x1 in range(-3, 203, 29):
            for y1 in range(0, 301, 47):
                for w, h in ((1, 1), (17, 35), (400, 400)):
                    region = (x1, y1, x1 + w, y1 + h)
                    assert np.array_equal(large.read(*region), crop(full, *region)), region


def test_16_bit_png_is_scaled(tmp_path):
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(tmp_path / "a.png")
    with LargeImage(tmp_path / "a.png") as large:
        assert large.strategy == "whole"  # 16-bit PNG: decoded whole, scaled to 8 bits as every reader does
        assert large.read(0, 63, 64, 64)[0, -1, 0] == round(4095 * 16 / 257)


def test_missing_truncated_and_non_image_files(tmp_path):
    with pytest.raises(BadImageError, match="does not exist"):
        LargeImage(tmp_path / "nope.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(BadImageError, match="cannot read image .*text.png"):
        LargeImage(tmp_path / "text.png")
    for name in ("a.png", "a.bmp", "a.jpg"):
        Image.fromarray(picture()).save(tmp_path / name)
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut{name}").write_bytes(data[: len(data) // 2])
        with LargeImage(tmp_path / f"cut{name}") as large, pytest.raises(BadImageError, match=f"rows 0..1100 of .*cut{name}"):
            large.read(0, 0, 700, 1100)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from Linux's /proc")
def test_huge_flat_png_is_read_band_by_band_in_little_memory(tmp_path):
    # 3,000 x 12,000 px, 108 MB decoded but 0.5 MB on disk: windows of 1,024 rows going down hold the
    # window's rows and a band (10 MB), the copies returned (the caller's last and the new one, 18 MB) and
    # what the allocator keeps; the stream is inflated a band at a time (an unbounded inflate of this flat
    # image returns 54 MB from one 256 KiB read)
    width, height = 3000, 12000
    array = np.zeros((height, width, 3), np.uint8)
    array[::97] = 200
    array[:, ::89] = (50, 60, 70)
    Image.fromarray(array).save(tmp_path / "big.png", compress_level=1)
    del array
    src = Path(monatune.__file__).parent  # import the module without the package's heavy __init__ (timm, ...)
    reader = textwrap.dedent(f"""
        import sys, types
        for name, path in (("monatune", {str(src)!r}), ("monatune.data", {str(src / "data")!r})):
            module = types.ModuleType(name)
            module.__path__ = [path]
            sys.modules[name] = module
        import numpy as np
        from monatune.data.large_images import LargeImage

        def status(key):  # kB; VmHWM is this process's peak (ru_maxrss keeps the parent's across exec)
            return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

        before = status("VmRSS")
        with LargeImage({str(tmp_path / "big.png")!r}) as image:
            assert image.strategy == "png-bands"
            w, h = image.size
            for y in range(0, h, 824):
                window = image.read(0, y, w, y + 1024)
                line = np.arange(y, y + len(window)) % 97 == 0
                assert (window[:, 1][line] == 200).all() and (window[:, 1][~line] == 0).all()
                assert (window[:, 89] == (50, 60, 70)).all() and len(window) == min(1024, h - y)
        print(status("VmHWM") - before)  # growth over the imports
    """)
    peak = int(subprocess.run([sys.executable, "-c", reader], check=True, capture_output=True, text=True).stdout)
    whole = width * height * 3
    assert peak < 0.5 * whole, f"peak {peak / 1e6:.0f} MB vs {whole / 1e6:.0f} MB decoded"
