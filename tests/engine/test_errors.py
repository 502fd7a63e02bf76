"""Mistakes a user can make stop ``monatune`` with code 2 and a message naming the culprit."""
import json
import shutil

import numpy as np
import pytest
from engine_helpers import run_main
from PIL import Image


def error_text(capsys, command: str = "fit") -> str:
    """The message after ``monatune <command>: error:``, which must be the last thing printed."""
    err = capsys.readouterr().err
    prefix = f"monatune {command}: error: "
    assert prefix in err, err[-2000:]
    return err[err.index(prefix) + len(prefix) :].strip()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model.init_args.pretrained", "missing.pth"], ["pretrained weights file 'missing.pth' does not exist"]),
        (["--data.init_args.root", "no-such-folder"], ["data folder 'no-such-folder' does not exist"]),
        (["--model.init_args.method", "monna"], ["unknown tuning method 'monna'", "mona"]),
        (["--model.init_args.method_options", '{"bottlenek": 8}'],
         ["unknown option(s) ['bottlenek'] for method 'mona'", "bottleneck"]),
    ],
    ids=["pretrained file", "data root", "method", "method option"],
)  # fmt: skip
def test_bad_setting_stops_before_anything_is_written(configs, in_tmp, capsys, args, expected):
    assert run_main("fit", "-c", configs.base, "--run_dir", in_tmp / "run", *args) == 2
    message = error_text(capsys)
    assert message.startswith(expected[0])  # the error itself, not wrapped in a report of the whole config
    assert "\n" not in message and all(text in message for text in expected)
    assert list(in_tmp.iterdir()) == []


@pytest.fixture
def data_with_broken_image(color_data, tmp_path):
    root = shutil.copytree(color_data, tmp_path / "data")
    broken = root / "train" / "red" / "broken.jpg"
    broken.write_bytes(np.random.default_rng(0).bytes(3000))  # not an image
    return root, broken


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_stops_fit_naming_it(configs, data_with_broken_image, tmp_path, capsys, workers):
    root, broken = data_with_broken_image
    run_dir = tmp_path / "run"
    code = run_main("fit", "-c", configs.base, "--run_dir", run_dir, "--data.init_args.root", root,
                    "--data.init_args.num_workers", workers, "--trainer.max_epochs", 1)  # fmt: skip
    assert code == 2
    message = error_text(capsys)
    if workers:  # torch re-raises a worker's error with the worker's traceback before the error's own text
        assert message.startswith("Caught BadImageError in DataLoader worker process")
        message = message.splitlines()[-1].removeprefix("monatune.data.images.BadImageError: ")
    assert message.startswith(f"cannot read image '{broken}'") and "on_bad_image=skip" in message
    assert not (run_dir / "results.json").exists() and not (run_dir / "adapter-last").exists()  # not a finished run


def test_skipping_unreadable_images_finishes_and_counts_them(configs, data_with_broken_image, tmp_path):
    root, _ = data_with_broken_image
    run_dir = tmp_path / "run"
    code = run_main("fit", "-c", configs.base, "--run_dir", run_dir, "--data.init_args.root", root,
                    "--data.init_args.on_bad_image", "skip", "--trainer.max_epochs", 1)  # fmt: skip
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["skipped_images"], results["steps"]) == (1, 5)  # 37 listed images, 5 batches of up to 8


def test_release_list_label_outside_classes_is_refused_before_training(configs, tmp_path, capsys):
    root = tmp_path / "release"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "classes.txt").write_text("blue\ngreen\nred\n")
    for split, labels in {"train": [0, 1, 2, 0, 1, 2], "val": [0, 1, 3], "test": [2, 1, 0]}.items():
        lines = []
        for i, label in enumerate(labels):
            (root / split).mkdir(exist_ok=True)
            Image.new("RGB", (40, 40), (60 * i, 0, 0)).save(root / split / f"{i}.jpg")
            lines.append(f"{i}.jpg {label}")
        (root / "meta" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    assert run_main("fit", "-c", configs.base, "--run_dir", run_dir, "--data.init_args.root", root) == 2
    message = error_text(capsys)
    assert message.startswith(f"label 3 on line 3 of '{root / 'meta' / 'val.txt'}' is outside the 3 classes (0..2")
    assert not run_dir.exists()


@pytest.mark.parametrize("command", ["test", "validate", "predict"])
def test_evaluating_needs_a_trained_run(configs, tmp_path, capsys, command):
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # a run directory with nothing trained in it
    assert run_main(command, "-c", configs.base, "--run_dir", run_dir) == 2
    message = error_text(capsys, command)
    assert message.startswith(f"nothing trained to {command}: '{run_dir / 'adapter-best'}' does not exist")
    assert list(run_dir.iterdir()) == []


def test_evaluating_adapter_last_names_it(configs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert run_main("test", "-c", configs.base, "--run_dir", run_dir, "--adapter_choice", "last") == 2
    assert error_text(capsys, "test").startswith(f"nothing trained to test: '{run_dir / 'adapter-last'}' does not exist")
