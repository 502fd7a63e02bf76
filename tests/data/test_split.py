"""``monatune split``: the DOTA devkit's image split (monatune.data.split)."""
import subprocess
import sys

import numpy as np
from PIL import Image

from monatune.cli import main
from monatune.data.split import sliding_windows, split_images


def test_windows_hand_computed():
    w = sliding_windows(2000, 1500, 1024, 200, 0.6)
    assert sorted(map(tuple, w[:, :2].tolist())) == [(0, 0), (0, 476), (824, 0), (824, 476), (976, 0), (976, 476)]
    # multi-scale: rate 0.5 doubles the window and the gap (2048, 400) -> one window for a 2000 x 1500 image
    w = sliding_windows(2000, 1500, [1024, 2048], [200, 400], 0.6)
    assert w[-1].tolist() == [0, 0, 2048, 2048] and len(w) == 7


def write_source(root, size=(1200, 500), lines=(), header=True):
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / "P0001.png")
    head = ["imagesource:GoogleEarth", "gsd:0.1"] if header else []
    (root / "labelTxt" / "P0001.txt").write_text("\n".join(head + list(lines)) + "\n")
    return root


def square(x, y, s, name="plane", difficult=0):
    return f"{x} {y} {x + s} {y} {x + s} {y + s} {x} {y + s} {name} {difficult}"


def read_patch(out, name):
    return [line.split() for line in (out / "annfiles" / f"{name}.txt").read_text().splitlines()]


def test_objects_iof_difficult_and_names(tmp_path):
    # 1200 x 500: x windows at 0 and 176 (1200 - 1024), one row padded below (500 < 1024, rate 0.49 -> kept as best)
    src = write_source(tmp_path / "src", lines=[
        square(100, 100, 40, "plane", 1),  # inside the first window only: difficult stays 1
        square(1000, 100, 40),  # 1000..1040: inside the second window; 24/40 = 0.6 of it in the first: dropped there
        square(1016, 300, 40),  # 1016..1056: 8/40 = 0.2 in the first (dropped); whole in the second
        square(150, 200, 40, "ship"),  # 150..190: 14/40 = 0.35 inside the second window (x >= 176): dropped there
        square(165, 200, 40, "ship"),  # 165..205: 29/40 = 0.725 inside the second window: kept, cut -> difficult 2
    ])  # fmt: skip
    summary = split_images([src], tmp_path / "out", progress=False)
    assert (summary.images, summary.patches, summary.objects_kept, summary.objects_dropped) == (1, 2, 5, 0)
    first, second = read_patch(tmp_path / "out", "P0001__1024__0___0"), read_patch(tmp_path / "out", "P0001__1024__176___0")
    assert [(r[8], r[9]) for r in first] == [("plane", "1"), ("ship", "0"), ("ship", "0")]
    assert [(r[8], r[9]) for r in second] == [("plane", "0"), ("plane", "0"), ("ship", "2")]
    assert second[0][:2] == ["824.0", "100.0"] and second[2][:2] == ["-11.0", "200.0"]  # moved, not clipped
    image = np.asarray(Image.open(tmp_path / "out" / "images" / "P0001__1024__176___0.png"))
    source = np.asarray(Image.open(src / "images" / "P0001.png"))
    assert image.shape == (1024, 1024, 3)
    assert np.array_equal(image[:500], source[:, 176:1200]) and (image[500:] == (124, 116, 104)).all()


def test_test_set_without_labels_and_multiscale(tmp_path):
    src = tmp_path / "test" / "images"
    src.mkdir(parents=True)
    Image.fromarray(np.zeros((1900, 1900, 3), np.uint8)).save(src / "P0002.png")
    summary = split_images([tmp_path / "test"], tmp_path / "out", rates=(0.5, 1.0), gaps=(500,), progress=False)
    names = sorted(p.stem for p in (tmp_path / "out" / "images").glob("*.png"))
    # rate 0.5: one 2048 window (gap 1000), 86% inside; rate 1: starts 0, 524, 876 on each axis
    singles = [f"P0002__1024__{x}___{y}" for x in (0, 524, 876) for y in (0, 524, 876)]
    assert names == sorted(singles + ["P0002__2048__0___0"]) and summary.patches == 10
    assert (tmp_path / "out" / "annfiles" / "P0002__2048__0___0.txt").read_text() == ""
    assert Image.open(tmp_path / "out" / "images" / "P0002__2048__0___0.png").size == (2048, 2048)


def test_resume_skips_finished_images_and_workers_agree(tmp_path):
    sources = []
    for k in range(3):
        root = tmp_path / f"s{k}"
        write_source(root, size=(900 + 100 * k, 700), lines=[square(50 + k, 60, 30)])
        (root / "images" / "P0001.png").rename(root / "images" / f"P{k}.png")
        (root / "labelTxt" / "P0001.txt").rename(root / "labelTxt" / f"P{k}.txt")
        sources.append(root)
    one = split_images(sources, tmp_path / "one", progress=False)
    again = split_images(sources, tmp_path / "one", progress=False)
    assert (one.images, again.images, again.already_done) == (3, 0, 3)
    split_images(sources, tmp_path / "two", workers=2, progress=False)
    for sub in ("images", "annfiles"):
        a = {p.name: p.read_bytes() for p in (tmp_path / "one" / sub).iterdir()}
        b = {p.name: p.read_bytes() for p in (tmp_path / "two" / sub).iterdir()}
        assert a == b and len(a) == 4  # the 1,100-wide image has two windows


def test_killed_split_finishes_on_rerun(tmp_path):
    sources = []
    for k in range(6):
        root = tmp_path / f"s{k}"
        (root / "images").mkdir(parents=True)
        Image.fromarray(np.full((1500, 1500, 3), k, np.uint8)).save(root / "images" / f"P{k}.png")
        sources.append(str(root))
    script = ("import sys; from monatune.data.split import split_images; "
              f"split_images({sources!r}, {str(tmp_path / 'out')!r}, progress=False)")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", script])
    done = tmp_path / "out" / ".split_done"
    for _ in range(600):  # kill it once some, not all, images are done
        if done.is_file() and done.read_text().strip():
            break
        proc.poll()
        import time

        time.sleep(0.05)
    proc.kill()
    proc.wait()
    split_images(sources, tmp_path / "out", progress=False)
    split_images(sources, tmp_path / "ref", progress=False)
    out = sorted(p.name for p in (tmp_path / "out" / "images").iterdir())
    assert out == sorted(p.name for p in (tmp_path / "ref" / "images").iterdir()) and len(out) == 24
    assert all(not p.name.startswith(".") for p in (tmp_path / "out" / "images").iterdir())  # no half-written patch
    for name in out:
        assert (tmp_path / "out" / "images" / name).read_bytes() == (tmp_path / "ref" / "images" / name).read_bytes()


def test_cli(tmp_path, capsys):
    src = write_source(tmp_path / "src", lines=[square(10, 10, 30)])
    assert main(["split", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    assert "split 1 image(s) into 2 patches" in capsys.readouterr().out
    assert main(["split", str(tmp_path / "nope"), str(tmp_path / "out"), "--quiet"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["split", str(src), str(tmp_path / "o2"), "--sizes", "100", "--gaps", "100", "--quiet"]) == 2
    assert "gap" in capsys.readouterr().err
