"""``on_bad_image=skip`` hides nothing: each skipped file is named once per run and counted once in
``results.json`` (across processes), and a split with no readable image left stops the run."""
import json
import shutil
import subprocess
import warnings

import numpy as np
import pytest
from engine_helpers import monatune_command, run_main, subprocess_env
from test_errors import error_text

from monatune.data.images import Skipped
from monatune.data.loading import collate_skipping

SKIP = ("--data.init_args.on_bad_image", "skip")


def spoil(path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(3000))  # not an image


@pytest.fixture
def data(color_data, tmp_path):
    return shutil.copytree(color_data, tmp_path / "data")


def test_collate_lists_the_skipped_files():
    good = {"image": np.zeros(2, np.float32), "target": 1, "path": "a.jpg"}
    batch = collate_skipping([Skipped("x.jpg"), good, Skipped("y.jpg")])
    assert batch["skipped"] == ["x.jpg", "y.jpg"] and len(batch["image"]) == 1 and batch["path"] == ["a.jpg"]
    assert collate_skipping([Skipped("x.jpg")]) == {"skipped": ["x.jpg"]}


def test_one_bad_file_over_three_epochs_is_one_file_named_once(configs, data, tmp_path):
    bad = data / "train" / "red" / "3.jpg"
    spoil(bad)
    run_dir = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = run_main("fit", "-c", configs.base, "--run_dir", run_dir, "--data.init_args.root", data, *SKIP)
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 3 and results["steps"] == 15  # every epoch read the other 35 images
    assert (results["skipped_images"], results["skipped_files"]) == (1, [str(bad)])
    named = [str(w.message) for w in caught if str(bad) in str(w.message)]
    assert len(named) == 1 and "on_bad_image=skip left out 1 unreadable image(s) in this training pass" in named[0]


@pytest.mark.parametrize("split, words", [("train", "training split 'train'"), ("val", "validation split 'val'")])
def test_a_split_with_no_readable_image_stops_the_run(configs, data, tmp_path, capsys, split, words):
    for path in (data / split).rglob("*.jpg"):
        spoil(path)
    run_dir = tmp_path / "run"
    code = run_main("fit", "-c", configs.base, "--run_dir", run_dir, "--data.init_args.root", data, *SKIP)
    assert code == 2
    message = error_text(capsys)
    count = len(list((data / split).rglob("*.jpg")))
    assert message.startswith(f"no image of the {words} could be read: all {count} were unreadable and skipped")
    assert str(sorted((data / split).rglob("*.jpg"))[0]) in message and "Fix or replace those files" in message
    assert not (run_dir / "results.json").exists() and not (run_dir / "adapter-best").exists()


def test_validate_with_no_readable_image_fails(configs, data, fitted_run, tmp_path, capsys):
    for path in (data / "val").rglob("*.jpg"):
        spoil(path)
    run_dir = shutil.copytree(fitted_run, tmp_path / "run")
    code = run_main("validate", "-c", configs.base, "-c", configs.mona, "--run_dir", run_dir, "--data.init_args.root",
                    data, *SKIP)  # fmt: skip
    assert code == 2
    assert error_text(capsys, "validate").startswith("no image of the validation split 'val' could be read")


def test_two_processes_count_each_others_skipped_files(configs, data, tmp_path):
    bad = [data / "val" / "red" / "3.jpg", data / "val" / "red" / "4.jpg"]  # items 13 and 14: one per process
    for path in bad:
        spoil(path)
    run_dir = tmp_path / "run"
    cmd = [
        *monatune_command(), "fit", "-c", str(configs.base), "--run_dir", str(run_dir), "--data.init_args.root",
        str(data), *SKIP, "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_epochs", "1",
        "--trainer.num_sanity_val_steps", "0",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["skipped_images"], results["skipped_files"]) == (2, sorted(map(str, bad)))
    assert proc.stderr.count(str(bad[1])) == 1  # named once, by rank zero
