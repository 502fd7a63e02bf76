"""``monatune split``: the DOTA devkit's image split as mmrotate's img_split.py (monatune.data.split)."""
import itertools
import math
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
from PIL import Image

from monatune.cli import main
from monatune.data.oriented import DOTA_CLASSES
from monatune.data.split import sliding_windows, split_images


def test_windows_hand_computed():
    # x: ceil((2000 - 1024) / 824 + 1) = 3 starts 0, 824, 1648 -> 976 (moved back); y: 0, 824 -> 476; x-major
    w = sliding_windows(2000, 1500, 1024, 200, 0.6)
    assert w.tolist() == [[x, y, x + 1024, y + 1024] for x in (0, 824, 976) for y in (0, 476)]
    # ms on the same image: 2048 (gap 1000, 71.5% inside), 1024 (gap 500, step 524), 682 (gap 333, step 349)
    w = sliding_windows(2000, 1500, [2048, 1024, 682], [1000, 500, 333], 0.6)
    assert w[0].tolist() == [0, 0, 2048, 2048] and len(w) == 1 + 3 * 2 + 5 * 4
    assert sorted({x for x, y, x2, _ in w.tolist() if x2 - x == 682}) == [0, 349, 698, 1047, 1318]
    assert sorted({y for x, y, x2, _ in w.tolist() if x2 - x == 682}) == [0, 349, 698, 818]
    # no window over 60% inside: those within 0.01 of the best stay (29.3% for both 1024 windows)
    assert sliding_windows(1100, 300, 1024, 200, 0.6).tolist() == [[0, 0, 1024, 1024], [76, 0, 1100, 1024]]
    assert len(sliding_windows(1100, 300, [1024, 2048], [200, 400], 0.6)) == 2  # the 2048 window: 7.9%
    with pytest.raises(ValueError, match="gap"):
        sliding_windows(100, 100, 64, 64)


def square(x, y, s, name="plane", difficult=None):
    return f"{x} {y} {x + s} {y} {x + s} {y + s} {x} {y + s} {name}" + ("" if difficult is None else f" {difficult}")


def diamond(cx, cy, d=10, name="ship"):
    return f"{cx - d} {cy} {cx} {cy - d} {cx + d} {cy} {cx} {cy + d} {name} 0"


def write_source(root, size=(1200, 500), lines=(), name="P0001", seed=0):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labelTxt").mkdir(exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "images" / f"{name}.png")
    (root / "labelTxt" / f"{name}.txt").write_text("\n".join(["imagesource:GoogleEarth", "gsd:0.146", *lines]) + "\n")
    return root


def read_patch(out, name):
    return [line.split() for line in (out / "annfiles" / f"{name}.txt").read_text().splitlines()]


# 1200 x 500: windows x = 0 and 176 (1200 - 1024), one row; both 48.8% inside, so both kept and padded below
OBJECTS = [
    square(100, 100, 40, "plane", 1),  # inside the first window only: difficult stays 1
    square(1000, 100, 40, "plane", 0),  # 1000..1040: 24/40 = 0.6 in the first (dropped); whole in the second
    square(1016, 300, 40, "plane", 0),  # 8/40 = 0.2 in the first (dropped); whole in the second
    square(150, 200, 40, "ship", 0),  # 150..190: whole in the first; 14/40 = 0.35 in the second (x >= 176): dropped
    square(165, 200, 40, "ship", 0),  # 29/40 = 0.725 in the second: kept, cut -> difficult 2
    # diamonds of half-diagonal 10 centred 1024 - t: 1 - (10 - t)^2 / 200 inside the first window
    diamond(1021.5, 400),  # t = 2.5: IoF 0.71875 -> kept there, difficult 2
    diamond(1022, 450),  # t = 2: IoF 0.68 -> dropped there; whole in the second
    square(300.1, 50.25, 10, "storage-tank"),  # 9 fields: difficult 0; in both windows; float32 coordinates
    square(1190, 480, 40, "not-a-dota-class", 0),  # 10/40 in the second window, nowhere else: dropped
    "1 2 3 plane",  # too few fields: skipped
    "a b c d e f g h plane 0",  # not numbers: skipped
]


def test_objects_iof_difficult_moved_not_clipped_and_names(tmp_path):
    src = write_source(tmp_path / "src", lines=OBJECTS)
    with pytest.warns(UserWarning, match="skipped 2 annotation line"):
        summary = split_images([src], tmp_path / "out", progress=False)
    assert (summary.images, summary.patches, summary.objects_kept, summary.objects_dropped) == (1, 2, 8, 1)
    assert summary.bad_lines == 2 and summary.objects_other_class == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["P0001__1024__0___0.png", "P0001__1024__176___0.png"]
    first, second = read_patch(out, "P0001__1024__0___0"), read_patch(out, "P0001__1024__176___0")
    assert [(r[8], r[9]) for r in first] == [("plane", "1"), ("ship", "0"), ("ship", "0"), ("ship", "2"),
                                             ("storage-tank", "0")]  # fmt: skip
    assert [(r[8], r[9]) for r in second] == [("plane", "0"), ("plane", "0"), ("ship", "2"), ("ship", "0"), ("ship", "0"),
                                              ("storage-tank", "0")]  # fmt: skip
    # numpy's float32 printing of float32 sums, as mmrotate writes them: 300.1 - 176 is 124.100006 in float32
    assert first[4][:8] == ["300.1", "50.25", "310.1", "50.25", "310.1", "60.25", "300.1", "60.25"]
    assert second[5][:3] == ["124.100006", "50.25", "134.1"]
    assert " ".join(second[0]) == "824.0 100.0 864.0 100.0 864.0 140.0 824.0 140.0 plane 0"
    assert second[2][:2] == ["-11.0", "200.0"]  # moved, not clipped
    image = np.asarray(Image.open(out / "images" / "P0001__1024__176___0.png"))
    source = np.asarray(Image.open(src / "images" / "P0001.png"))
    assert image.shape == (1024, 1024, 3)
    assert np.array_equal(image[:500], source[:, 176:1200]) and (image[500:] == (124, 116, 104)).all()

    # classes given: the object of another class is left out (mmrotate keeps every class)
    with pytest.warns(UserWarning):
        summary = split_images([src / "images"], tmp_path / "dota", progress=False, classes=DOTA_CLASSES)
    assert (summary.objects_kept, summary.objects_dropped, summary.objects_other_class) == (8, 0, 1)


def devkit_annfiles(width, height, boxes, names, difficult, size, gap, iof_thr=0.7):
    """mmrotate img_split.py's get_sliding_window, get_window_obj and annfile lines, transliterated; its
    shapely IoF is exact here because the objects are axis-aligned boxes (overlap area / float32 area)."""
    step = size - gap
    x_num = 1 if width <= size else math.ceil((width - size) / step + 1)
    x_start = [step * i for i in range(x_num)]
    if len(x_start) > 1 and x_start[-1] + size > width:
        x_start[-1] = width - size
    y_num = 1 if height <= size else math.ceil((height - size) / step + 1)
    y_start = [step * i for i in range(y_num)]
    if len(y_start) > 1 and y_start[-1] + size > height:
        y_start[-1] = height - size
    start = np.array(list(itertools.product(x_start, y_start)), dtype=np.int64)
    windows = np.concatenate([start, start + size], axis=1)
    inside = windows.copy()
    inside[:, 0::2] = np.clip(inside[:, 0::2], 0, width)
    inside[:, 1::2] = np.clip(inside[:, 1::2], 0, height)
    rates = (inside[:, 2] - inside[:, 0]) * (inside[:, 3] - inside[:, 1]) / size**2
    if not (rates > 0.6).any():
        rates[abs(rates - rates.max()) < 0.01] = 1
    windows = windows[rates > 0.6]
    polys = np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 0],
                      boxes[:, 3]], -1).astype(np.float32)  # fmt: skip
    lt = np.maximum(boxes[:, None, :2], windows[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], windows[None, :, 2:])
    wh = np.clip(rb - lt, 0, np.inf)
    areas = np.array((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), dtype=np.float32)
    iofs = wh[..., 0] * wh[..., 1] / np.clip(areas, 1e-6, np.inf)[:, None]
    files = {}
    for i, (x1, y1, x2, _) in enumerate(windows.tolist()):
        pos = np.nonzero(iofs[:, i] >= iof_thr)[0]
        moved = polys[pos] + np.array([-x1, -y1] * 4, dtype=np.float32)
        lines = [" ".join(map(str, moved[j])) + " " + names[k] + " " + (str(difficult[k]) if iofs[k, i] >= 1 else "2")
                 for j, k in enumerate(pos)]  # fmt: skip
        files[f"P0001__{x2 - x1}__{x1}___{y1}.txt"] = "".join(line + "\n" for line in lines)
    return files


def test_annfiles_equal_a_transliteration_of_mmrotate(tmp_path):
    rng = np.random.default_rng(3)
    width, height, n = 730, 530, 300
    corner = rng.integers(-60, 760, (n, 2)) + rng.choice([0, 0.5, 0.25], (n, 2))
    boxes = np.concatenate([corner, corner + rng.integers(1, 150, (n, 2)) + rng.choice([0, 0.5], (n, 2))], 1)
    names, difficult = rng.choice(["plane", "ship", "small-vehicle"], n).tolist(), rng.integers(0, 2, n).tolist()
    lines = [f"{x1} {y1} {x2} {y1} {x2} {y2} {x1} {y2} {name} {d}"
             for (x1, y1, x2, y2), name, d in zip(boxes.tolist(), names, difficult)]  # fmt: skip
    src = write_source(tmp_path / "src", size=(width, height), lines=lines)
    summary = split_images([src], tmp_path / "out", sizes=(256,), gaps=(56,), progress=False)
    got = {p.name: p.read_text() for p in (tmp_path / "out" / "annfiles").iterdir()}
    expected = devkit_annfiles(width, height, boxes, names, difficult, 256, 56)
    assert got == expected and summary.patches == len(expected) == 4 * 3
    assert sum(text.count(" 2\n") for text in got.values()) > 50 and summary.objects_kept > 150  # cut, kept


def test_test_set_without_labels_and_multiscale(tmp_path):
    src = tmp_path / "test" / "images"
    src.mkdir(parents=True)
    Image.fromarray(np.zeros((1900, 1900, 3), np.uint8)).save(src / "P0002.png")
    summary = split_images(tmp_path / "test", tmp_path / "out", rates=(0.5, 1.0, 1.5), gaps=(500,), progress=False)
    names = sorted(p.stem for p in (tmp_path / "out" / "images").glob("*.png"))
    # rate 0.5: one 2048 window (gap 1000), 86% inside; rate 1: starts 0, 524, 876; rate 1.5: 682 windows
    # every 349 (gap int(500 / 1.5) = 333): 0, 349, 698, 1047, 1218 (moved back)
    expected = ["P0002__2048__0___0"]
    expected += [f"P0002__1024__{x}___{y}" for x in (0, 524, 876) for y in (0, 524, 876)]
    expected += [f"P0002__682__{x}___{y}" for x in (0, 349, 698, 1047, 1218) for y in (0, 349, 698, 1047, 1218)]
    assert names == sorted(expected) and summary.patches == 35
    assert (tmp_path / "out" / "annfiles" / "P0002__2048__0___0.txt").read_text() == ""  # written, empty
    big = np.asarray(Image.open(tmp_path / "out" / "images" / "P0002__2048__0___0.png"))
    assert big.shape == (2048, 2048, 3) and (big[:1900, :1900] == 0).all() and (big[1900:] == (124, 116, 104)).all()


def test_resume_skips_finished_images_and_refuses_other_settings(tmp_path):
    sources = [write_source(tmp_path / f"s{k}", size=(700 + 100 * k, 600), lines=[square(50 + k, 60, 30)], name=f"P{k}")
               for k in range(3)]  # fmt: skip
    one = split_images(sources, tmp_path / "out", progress=False)
    stale = tmp_path / "out" / "images" / ".P0__1024__0___0.png.x1y2.tmp"  # what a killed write leaves
    stale.write_bytes(b"half")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "images").iterdir() if p != stale}
    again = split_images(sources, tmp_path / "out", progress=False)
    assert (one.images, one.patches, again.images, again.patches, again.already_done) == (3, 3, 0, 0, 3)
    assert not stale.exists()
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "images").iterdir()} == before  # nothing rewritten
    with pytest.raises(ValueError, match="other settings"):
        split_images(sources, tmp_path / "out", gaps=(100,), progress=False)


def _split_forever(sources, out):  # in a forked child, killed mid-run
    import torch

    torch.set_num_threads(1)
    split_images(sources, out, sizes=(512,), gaps=(112,), progress=False)


def test_killed_split_finishes_on_rerun(tmp_path):
    sources = []
    for k in range(10):
        root = tmp_path / f"s{k}"
        (root / "images").mkdir(parents=True)
        ramp = np.add.outer(np.arange(600), 2 * np.arange(600)) * (k + 1)
        Image.fromarray(np.stack([ramp, ramp // 3, ramp // 7], -1).astype(np.uint8)).save(root / "images" / f"P{k}.png")
        sources.append(root)
    out, record = tmp_path / "out", tmp_path / "out" / ".split_done"
    child = multiprocessing.get_context("fork").Process(target=_split_forever, args=(sources, out))
    child.start()
    deadline = time.monotonic() + 60
    while not (record.is_file() and len(record.read_text().splitlines()) > 1) and time.monotonic() < deadline:
        time.sleep(0.002)  # kill it once one image, not all, is done
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    finished = len(record.read_text().splitlines()) - 1
    assert 1 <= finished < 10
    rerun = split_images(sources, out, sizes=(512,), gaps=(112,), progress=False)
    assert rerun.already_done == finished and rerun.images == 10 - finished
    split_images(sources, tmp_path / "ref", sizes=(512,), gaps=(112,), progress=False)
    for sub in ("images", "annfiles"):
        got = {p.name: p.read_bytes() for p in (out / sub).iterdir()}
        ref = {p.name: p.read_bytes() for p in (tmp_path / "ref" / sub).iterdir()}
        assert got == ref and len(got) == 10 * 4  # windows at 0 and 88 on each axis; no leftover temporary file


def test_cli(tmp_path, capsys):
    src = write_source(tmp_path / "src", lines=[square(10, 10, 30), square(500, 10, 30, "ufo")])
    assert main(["split", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    assert "split 1 image(s) into 2 patches" in capsys.readouterr().out
    assert main(["split", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "split 0 image(s) into 0 patches" in out and "1 already done" in out
    args = ["split", str(src), str(tmp_path / "o2"), "--quiet", "--size", "600", "--gap", "100", "--rate", "1", "2",
            "--classes", "dota", "--padding-value", "1", "2", "3", "--save-ext", ".jpg"]  # fmt: skip
    assert main(args) == 0
    # 600 windows every 500 on 1200 x 500 (x 0, 500, 600; 83% inside) and 300 windows every 250 (x 0, 250, 500,
    # 750, 900; y 0, 200): 3 + 10
    out = capsys.readouterr().out
    assert "into 13 patches" in out and "1 objects of other classes left out" in out
    assert sorted(p.name for p in (tmp_path / "o2" / "images").iterdir())[:2] == ["P0001__300__0___0.jpg",
                                                                                   "P0001__300__0___200.jpg"]  # fmt: skip
    (tmp_path / "broken" / "images").mkdir(parents=True)
    (tmp_path / "broken" / "images" / "P9.png").write_bytes(b"not a png")
    for bad, message in [
        (["split", str(tmp_path / "nope"), str(tmp_path / "o3")], "not a folder"),
        (["split", str(tmp_path / "broken"), str(tmp_path / "o3")], "cannot read image"),
        (["split", str(src), str(tmp_path / "o3"), "--sizes", "100", "--gaps", "100"], "gap"),
        (["split", str(src), str(tmp_path / "out"), "--iof-thr", "0.5"], "other settings"),
    ]:
        assert main([*bad, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("monatune split: error:") and message in err and err.count("\n") == 1
