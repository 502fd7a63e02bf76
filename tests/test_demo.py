"""The built-in demo: shipped digits, cached pretraining, a row per method (on a shortened schedule)."""
import json

import numpy as np
from PIL import Image

from monatune.demo import DEMO_METHODS, read_digits, run_demo, write_digits, write_shapes


def test_shipped_digits_are_the_uci_test_set():
    images, labels = read_digits()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert images.min() == 0 and images.max() == 16
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_digit_folders_split_every_image_once(tmp_path):
    root = write_digits(tmp_path / "digits")
    files = {split: sorted((root / split).rglob("*.png")) for split in ("train", "val", "test")}
    assert [len(f) for f in files.values()] == [1078, 359, 360]
    names = [p.name for f in files.values() for p in f]
    assert len(set(names)) == 1797
    with Image.open(files["test"][0]) as im:
        assert im.size == (32, 32)


def test_shapes_are_deterministic(tmp_path):
    a, b = write_shapes(tmp_path / "a", per_class=2, seed=3), write_shapes(tmp_path / "b", per_class=2, seed=3)
    pa, pb = sorted(a.rglob("*.png")), sorted(b.rglob("*.png"))
    assert len(pa) == 8 * 2 + 8 * 2  # train and val, 8 shapes
    assert all(np.array_equal(np.asarray(Image.open(x)), np.asarray(Image.open(y))) for x, y in zip(pa, pb))


def test_demo_runs_end_to_end_and_reuses_the_cached_backbone(tmp_path):
    logs: list[str] = []
    kwargs = dict(methods=["fixed", "mona"], epochs=1, pretrain_epochs=1, shapes_per_class=16, cache=tmp_path / "cache",
                  progress=False, log=logs.append)
    rows = run_demo(tmp_path / "out", **kwargs)
    assert [r["method"] for r in rows] == ["fixed", "mona"]
    fixed, mona = rows
    assert fixed["trainable"] == 1930  # the 10-class head of the 192-channel demo Swin
    assert mona["trainable"] > fixed["trainable"] and mona["trainable_percent"] < 5
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["fit_seconds"] > 0 for r in rows)
    assert json.loads((tmp_path / "out" / "demo.json").read_text())["rows"] == rows
    assert (tmp_path / "out" / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| mona |" in (tmp_path / "out" / "demo.md").read_text()
    assert (tmp_path / "out" / "mona" / "adapter-best" / "adapter_model.safetensors").is_file()
    assert any("pretraining" in line for line in logs)

    logs.clear()
    run_demo(tmp_path / "out2", **{**kwargs, "methods": ["fixed"]})
    assert any("cached" in line for line in logs) and not any("pretraining" in line for line in logs)


def test_demo_refuses_unknown_methods(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="unknown"):
        run_demo(tmp_path, methods=["mona", "nope"], cache=tmp_path)
    assert set(DEMO_METHODS) == {"full", "fixed", "lora", "adapter", "mona"}


def test_a_partial_digits_folder_is_never_reused(tmp_path):
    """A write killed half-way leaves no folder (it is moved in complete); a partial one an older version
    left is written again instead of scoring the test split on a fraction of its images."""
    import signal
    import subprocess
    import sys
    import time

    from monatune.demo import prepare_digits

    root = tmp_path / "digits"
    code = f"from monatune.demo import write_digits; write_digits(__import__('pathlib').Path({str(root)!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while not any(tmp_path.glob(".digits.saving-*/test")) and time.time() < deadline:  # it is writing
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not root.exists()  # only the staged leftover, which the next write removes
    partial = root / "test" / "0"
    partial.mkdir(parents=True)
    Image.new("L", (32, 32)).save(partial / "0001.png")
    prepare_digits(root)
    assert len(list(root.rglob("*.png"))) == 1797 and sorted(p.name for p in tmp_path.iterdir()) == ["digits"]
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    prepare_digits(root)  # complete: reused as it is
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.png")} == before
