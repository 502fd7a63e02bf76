"""Bad settings give one line naming the setting, the value and what is allowed, before any training, and exit 2."""
import json
import re
import shutil

import pytest
import torch
from engine_helpers import run_main


def _one_line_error(capsys, command="fit"):
    err = capsys.readouterr().err
    # Lightning's log handler may still hold an earlier test's captured stream (a pytest artefact, not output)
    err = re.sub(r"--- Logging error ---.*?\nArguments:[^\n]*\n", "", err, flags=re.S)
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(f"monatune {command}: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("override,message", [
    ("data.init_args.image_size=48", "data.init_args.image_size is 48 but swin_tiny_patch4_window7_224 takes 32x32 "
                                     "images; set data.init_args.image_size=32, or .*model_kwargs.img_size=48"),
    ("model.init_args.num_classes=2", "num_classes is 2 but the data has 3 classes \\(blue, green, red\\).* set it to 3"),
    ("data.init_args.format=nope", "unknown data format 'nope' \\(data.init_args.format\\); choose one of imagefolder"),
    ("data.init_args.batch_size=0", "`batch_size` must be at least 1, got 0"),
    ("data.init_args.on_bad_image=nope", "on_bad_image must be one of error, skip, got 'nope'"),
    ("data.init_args.root=/nonexistent/data", "data folder '/nonexistent/data' does not exist"),
    ("model.init_args.method=nope", "unknown tuning method 'nope'; supported: full, fixed"),
    ('model.init_args.method_options={"kernel_sizes": 4}', "mona option `kernel_sizes` must be .*odd.*, got 4"),
    ('model.init_args.method_options={"rank": 4}', r"unknown option\(s\) \['rank'\] for method 'mona'; its options are"),
    ("model.init_args.pretrained=/nonexistent.pth", "pretrained weights file '/nonexistent.pth' does not exist"),
    ("model.init_args.pretrained=DIR", "pretrained weights file '.*' is a directory; give the checkpoint file in it"),
])  # fmt: skip
def test_bad_settings_are_one_line_errors_before_training(configs, tmp_path, capsys, override, message):
    override = override.replace("DIR", str(tmp_path))
    run_dir = tmp_path / "run"
    assert run_main("fit", "-c", configs.base, "-c", configs.mona, "--run_dir", run_dir, override) == 2
    assert re.search(message, _one_line_error(capsys))
    assert not (run_dir / "checkpoints").exists()  # nothing trained


@pytest.fixture
def stopped_run(fitted_run, tmp_path):
    """A copy of the fitted run as a stopped one (its last checkpoint, no results)."""
    run_dir = shutil.copytree(fitted_run, tmp_path / "run")
    (run_dir / "results.json").unlink()
    return run_dir


def test_resume_from_a_damaged_checkpoint_is_one_line(configs, stopped_run, capsys):
    ckpt = stopped_run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert run_main("fit", "-c", configs.base, "-c", configs.mona, "--run_dir", stopped_run, "--resume") == 2
    line = _one_line_error(capsys)
    assert f"cannot resume: '{ckpt}' is damaged" in line and "remove it and add --resume" in line


def test_resume_with_other_method_options_is_one_line(configs, stopped_run, capsys):
    args = ["fit", "-c", configs.base, "-c", configs.mona, "--run_dir", stopped_run, "--resume"]
    assert run_main(*args, 'model.init_args.method_options={"bottleneck": 8}') == 2
    line = _one_line_error(capsys)
    assert "the run started with model.init_args.method_options={'bottleneck': 16}, the config now says {'bottleneck': 8}" in line
    assert run_main(*args, "model.init_args.lr=0.5") == 0  # what the weights do not depend on may change
    assert json.loads((stopped_run / "results.json").read_text())["steps"] == 15


def test_resume_with_another_class_count_is_one_line(configs, stopped_run, color_data, tmp_path, capsys):
    more = shutil.copytree(color_data, tmp_path / "more")
    for split in ("train", "val", "test"):
        shutil.copytree(more / split / "red", more / split / "yellow")
    args = ["fit", "-c", configs.base, "-c", configs.mona, "--run_dir", stopped_run, "--resume"]
    assert run_main(*args, f"data.init_args.root={more}") == 2
    line = _one_line_error(capsys)
    assert "the checkpoint does not fit this model" in line and "(3, " in line and "(4, " in line
    assert torch.load(stopped_run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 15
