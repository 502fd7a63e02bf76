"""Parameter counts: the release's exact numbers, the report, the command."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import monatune
from monatune.cli import main

RELEASE = {  # adapter params (Mona) and frozen backbone params, measured from the released code
    "swin_base_patch4_window7_224": (3_667_456, 86_745_016),
    "swin_large_patch4_window7_224": (5_267_712, 194_998_164),
}


@pytest.mark.parametrize("name", sorted(RELEASE))
def test_mona_counts_match_the_release(name):
    with torch.device("meta"):
        report = monatune.count_parameters(monatune.build_dense_backbone(name, "mona"))
    adapter, backbone = RELEASE[name]
    assert (report.adapter, report.trainable, report.backbone, report.total) == (adapter, adapter, backbone, adapter + backbone)
    assert report.by_kind == {"backbone": {"total": backbone, "trainable": 0}, "adapter:mona": {"total": adapter, "trainable": adapter}}


def test_report_includes_the_head_and_percent():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=7)
    monatune.apply(model, "mona")
    report = monatune.count_parameters(model)
    assert report.head == 192 * 7 + 7
    assert report.trainable == report.adapter + report.head
    assert report.trainable_percent == pytest.approx(100 * report.trainable / report.total)
    assert f"trainable {report.trainable:,} of {report.total:,}" in str(report)


def test_params_command_json(capsys):
    assert main(["params", "swin_base_patch4_window7_224", "--method", "mona", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["total"], data["trainable"], data["adapter"]) == (90_412_472, 3_667_456, 3_667_456)


def test_params_command_options_and_errors(capsys):
    assert main(["params", "swin_tiny_patch4_window7_224", "-o", "bottleneck=32", "--json"]) == 0
    small = json.loads(capsys.readouterr().out)["adapter"]
    # 12 blocks x 2 adapters: each LN 2C, scales 2C, down 32C+32, up 32C+C, convs 32*(9+25+49+3) + 32*32+32
    dims = [96] * 4 + [192] * 4 + [384] * 12 + [768] * 4
    assert small == sum(4 * c + 32 * c + 32 + 32 * c + c + 32 * 86 + 32 * 32 + 32 for c in dims)
    assert main(["params", "swin_tiny_patch4_window7_224", "--method", "nope"]) == 2
    assert "unknown tuning method 'nope'; supported: full, fixed, bitfit" in capsys.readouterr().err


def test_console_script_is_installed():
    """The `monatune` command the README runs (needs the package installed, as the README says)."""
    script = shutil.which("monatune") or str(Path(sys.executable).with_name("monatune"))
    assert Path(script).exists(), "the `monatune` console script is missing: pip install the package first"
    out = subprocess.run([script, "params", "swin_large_patch4_window7_224", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["adapter"] == 5_267_712


def test_python_dash_m_runs_the_same_command():
    """``python -m monatune`` is the command, its exit status included (one interpreter start: the console script's
    test above runs a good command)."""
    bad = subprocess.run([sys.executable, "-m", "monatune", "params", "no_such_model_xyz"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no_such_model_xyz" in bad.stderr
