"""Region reads of large images (monatune.data.large_images)."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from monatune.data.images import BadImageError
from monatune.data.large_images import LargeImage

REGIONS = [(0, 0, 700, 300), (10, 200, 500, 900), (100, 880, 700, 1100), (0, 0, 50, 50), (3, 5, 9, 12),
           (0, 1000, 700, 1100), (-5, -5, 20, 20), (690, 1090, 800, 1200)]  # fmt: skip


def picture(seed=0):
    a = np.random.default_rng(seed).integers(0, 255, (1100, 700, 3)).astype(np.uint8)
    a[::5] //= 3  # rows and columns that make the PNG filters differ from row to row
    a[:, ::3] = 7
    return a


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA"])
def test_png_bands_equal_a_full_decode(tmp_path, mode):
    image = Image.fromarray(picture()).convert(mode)
    image.save(tmp_path / "a.png")
    full = np.asarray(image.convert("RGB"))
    with LargeImage(tmp_path / "a.png") as large:
        assert large.streaming and large.size == (700, 1100)
        for x1, y1, x2, y2 in REGIONS:  # in any order: going back restarts from the top
            got = large.read(x1, y1, x2, y2)
            assert np.array_equal(got, full[max(0, y1) : y2, max(0, x1) : x2]), (x1, y1, x2, y2)


@pytest.mark.parametrize("suffix", [".jpg", ".tif", ".bmp"])
def test_other_formats_read_whole(tmp_path, suffix):
    Image.fromarray(picture(1)).save(tmp_path / f"a{suffix}")
    full = np.asarray(Image.open(tmp_path / f"a{suffix}").convert("RGB"))
    with LargeImage(tmp_path / f"a{suffix}") as large:
        assert not large.streaming
        for x1, y1, x2, y2 in REGIONS:
            assert np.array_equal(large.read(x1, y1, x2, y2), full[max(0, y1) : y2, max(0, x1) : x2])


def test_16_bit_png_is_scaled(tmp_path):
    Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)).save(tmp_path / "a.png")
    with LargeImage(tmp_path / "a.png") as large:
        assert not large.streaming  # 16-bit PNG: decoded whole, scaled to 8 bits as every reader does
        assert large.read(0, 63, 64, 64)[0, -1, 0] == round(4095 * 16 / 257)


def test_missing_truncated_and_non_image_files(tmp_path):
    with pytest.raises(BadImageError, match="does not exist"):
        LargeImage(tmp_path / "nope.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(BadImageError, match="cannot read"):
        LargeImage(tmp_path / "text.png")
    Image.fromarray(picture()).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with LargeImage(tmp_path / "cut.png") as large, pytest.raises(BadImageError, match="cannot read rows"):
        large.read(0, 0, 700, 1100)


def test_huge_png_is_read_band_by_band_in_little_memory(tmp_path):
    # 12,000 x 3,840 px (138 MB decoded):
    # windows of 1,024 rows read band by band must hold far less than the whole image
    path = tmp_path / "big.png"
    script = textwrap.dedent(f"""
        import numpy as np, resource, sys
        from PIL import Image
        rows = np.random.default_rng(0).integers(0, 255, (64, 12000, 3)).astype(np.uint8)
        Image.fromarray(np.tile(rows, (60, 1, 1))).save({str(path)!r}, compress_level=1)
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    reader = textwrap.dedent(f"""
        import resource
        from monatune.data.large_images import LargeImage
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with LargeImage({str(path)!r}) as image:
            w, h = image.size
            y = 0
            while y < h:
                image.read(0, y, w, y + 1024)
                y += 824
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)  # growth over the imports
    """)
    peak = int(subprocess.run([sys.executable, "-c", reader], check=True, capture_output=True, text=True).stdout)
    whole = 12000 * 64 * 60 * 3
    assert peak < whole * 0.75, f"peak {peak / 1e6:.0f} MB vs {whole / 1e6:.0f} MB decoded"
