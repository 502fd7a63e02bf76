"""`monatune params -c CONFIG [-c METHOD.yaml]`: whole task models counted by part, as issue #16 states them."""
import json
from pathlib import Path

import pytest

from monatune.cli import main
from monatune.params import count_config_parameters

ROOT = Path(__file__).resolve().parents[1]
COCO_CASCADE = ROOT / "configs" / "det" / "coco_cascade_mask_rcnn_swin_b_3x.yaml"
COCO_MASK_RCNN = ROOT / "configs" / "det" / "coco_mask_rcnn_swin_b_3x.yaml"
VOC_RETINANET = ROOT / "configs" / "det" / "voc_retinanet_swin_l.yaml"
ADE_UPERNET = ROOT / "configs" / "seg" / "ade20k_upernet_swin_l.yaml"
FLOWERS = ROOT / "configs" / "cls" / "flowers102_swin_l.yaml"
SWIN_T = "swin_tiny_patch4_window7_224"


def method(name: str) -> Path:
    return ROOT / "configs" / "methods" / f"{name}.yaml"


def counts(total: int, trainable: int | None = None) -> dict[str, int]:
    return {"total": total, "trainable": total if trainable is None else trainable}


def parts_add_up(report) -> bool:
    return (sum(c["total"] for c in report.parts.values()), sum(c["trainable"] for c in report.parts.values())) == (
        report.total,
        report.trainable,
    )


# -- the counts (sections 1-3) ---------------------------------------------------------------


@pytest.mark.slow
def test_coco_cascade_mask_rcnn_swin_b_mona():
    report = count_config_parameters([COCO_CASCADE, method("mona")])
    assert (report.total, report.trainable) == (148_644_458, 61_899_442)
    assert (report.backbone, report.adapter, report.num_classes) == (90_412_472, 3_667_456, 80)
    # the backbone: Swin-B 86,741,176 + its four output norms 3,840, frozen, + Mona 3,667,456, trained
    assert report.parts == {
        "backbone": counts(90_412_472, 3_667_456),
        "neck": counts(2_852_864),  # FPN
        "rpn": counts(593_935),
        **{f"box_head_{i}": counts(15_618_449) for i in (1, 2, 3)},
        **{f"mask_head_{i}": counts(2_643_280) for i in (1, 2, 3)},
    }
    assert parts_add_up(report)


@pytest.mark.slow
def test_voc_retinanet_swin_l_mona():
    report = count_config_parameters([VOC_RETINANET, method("mona")])
    assert report.total == 212_072_428
    assert (report.backbone, report.adapter, report.num_classes) == (200_265_492, 5_267_712, 20)  # stages 1-3: no norm0
    assert report.parts == {
        "backbone": counts(200_265_492, 5_267_712),
        "neck": counts(6_588_416),  # FPN with P6 from C5 and P7 from P6
        "head": counts(5_218_520),  # 20 sigmoid channels per anchor, no background
    }
    assert report.trainable == 5_267_712 + 6_588_416 + 5_218_520
    assert parts_add_up(report)


@pytest.mark.slow
def test_ade20k_upernet_swin_l_mona():
    report = count_config_parameters([ADE_UPERNET, method("mona")])
    assert report.total == 239_027_648
    assert (report.backbone, report.adapter, report.num_classes) == (200_265_876, 5_267_712, 150)  # window 7
    assert report.parts == {
        "backbone": counts(200_265_876, 5_267_712),
        "decode_head": counts(36_953_238),  # UPerHead
        "aux_head": counts(1_808_534),  # FCN on stage 3
    }
    assert report.trainable == 5_267_712 + 36_953_238 + 1_808_534
    assert parts_add_up(report)


# -- the published Swin figures (the Swin paper's Table 2 and 3), in millions, 80 classes, no adapter ------


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, backbone, millions",
    [
        (COCO_CASCADE, None, 145),  # Cascade Mask R-CNN Swin-B
        (COCO_CASCADE, SWIN_T, 86),  # Cascade Mask R-CNN Swin-T
        (COCO_MASK_RCNN, SWIN_T, 48),  # Mask R-CNN Swin-T
    ],
)
def test_published_swin_detector_sizes(config, backbone, millions):
    init_args = {"backbone": backbone} if backbone else {}
    report = count_config_parameters([config, method("full")], init_args=init_args)
    assert round(report.total / 1e6) == millions
    assert report.trainable == report.total and report.adapter == 0


# -- parts of the other tasks, class counts, overrides ------------------------------------------------


@pytest.mark.slow
def test_classifier_parts_and_class_count_from_the_format():
    report = count_config_parameters([FLOWERS, method("mona")])
    assert report.num_classes == 102 and report.classes_from == "the flowers102 format's list"
    assert list(report.parts) == ["backbone", "head"]
    assert report.parts["head"] == counts(1536 * 102 + 102)  # Swin-L's classifier
    assert report.parts["backbone"]["trainable"] == report.adapter == 5_267_712
    assert parts_add_up(report)


@pytest.mark.slow
def test_num_classes_and_method_overrides():
    base = count_config_parameters([FLOWERS, method("mona")])
    fewer = count_config_parameters([FLOWERS, method("mona")], num_classes=10)
    assert base.total - fewer.total == 1536 * 92 + 92 and fewer.classes_from == "given"
    lora = count_config_parameters([FLOWERS, method("mona")], init_args={"method": "lora", "method_options": {"rank": 8}})
    assert lora.method == "lora" and lora.adapter == count_config_parameters([FLOWERS, method("lora")]).adapter // 8


@pytest.mark.slow
def test_nothing_is_loaded_or_read(tmp_path):
    """The configs name a pretrained file and a data folder that do not exist; counting needs neither."""
    config = tmp_path / "seg.yaml"
    config.write_text(
        ADE_UPERNET.read_text()
        .replace("checkpoints/swin_large_patch4_window7_224_22k.pth", str(tmp_path / "missing.pth"))
        .replace("data/ade", str(tmp_path / "no_data"))
    )
    report = count_config_parameters([config, method("lora")])
    assert report.method == "lora" and report.total == report.backbone + 36_953_238 + 1_808_534
    assert not (tmp_path / "no_data").exists()


def test_folder_class_lists_need_num_classes(tmp_path):
    config = tmp_path / "folder.yaml"
    config.write_text(FLOWERS.read_text().replace("format: flowers102", "format: imagefolder"))
    with pytest.raises(ValueError, match=r"comes from its folder.*--num-classes"):
        count_config_parameters([config])
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n\nbird\n")
    config.write_text(config.read_text() + f"    classes: {classes}\n")
    report = count_config_parameters([config], init_args={"backbone": SWIN_T})
    assert report.num_classes == 3 and report.parts["head"] == counts(768 * 3 + 3)


# -- the command ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_params_command_json_and_text(capsys):
    assert main(["params", "-c", str(ADE_UPERNET), "-c", str(method("mona")), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {k: data[k] for k in ("total", "trainable", "backbone", "adapter")} == {
        "total": 239_027_648, "trainable": 44_029_484, "backbone": 200_265_876, "adapter": 5_267_712,
    }  # fmt: skip
    assert data["parts"]["aux_head"] == counts(1_808_534)
    assert all(isinstance(data[k], int) for k in ("total", "trainable", "backbone", "adapter"))
    assert main(["params", "-c", str(ADE_UPERNET), "-c", str(method("mona"))]) == 0
    text = capsys.readouterr().out
    assert "trainable 44,029,484 of 239,027,648" in text and "decode_head" in text and "150 classes" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-c", "no/such/config.yaml"], "config file 'no/such/config.yaml' does not exist"),
        (["-c", str(VOC_RETINANET), "--method", "nope"], "unknown tuning method 'nope'"),
        (["-c", str(method("mona"))], "no `model.class_path`"),
        ([], "give a timm name"),
        (["swin_tiny_patch4_window7_224", "-c", str(VOC_RETINANET)], "give a timm name"),
        (["swin_tiny_patch4_window7_224", "--num-classes", "3"], "--num-classes goes with -c CONFIG"),
    ],
)
def test_params_command_errors(capsys, argv, message):
    assert main(["params", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("monatune params: error: ") and message in captured.err


@pytest.mark.parametrize(
    "model, message",
    [
        ("monatune.tasks.NoSuchTask", "names model class 'monatune.tasks.NoSuchTask', which is not a monatune task"),
        ("torch.nn.Linear", "names model class 'torch.nn.Linear', which is not a monatune task"),
    ],
)
def test_params_command_refuses_unknown_task_classes(tmp_path, capsys, model, message):
    config = tmp_path / "task.yaml"
    config.write_text(f"model:\n  class_path: {model}\n  init_args:\n    backbone: {SWIN_T}\n")
    assert main(["params", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_unknown_method_in_a_config_stops_before_building(tmp_path, monkeypatch, capsys):
    from monatune.engine.module import TunedModule

    built = []
    monkeypatch.setattr(TunedModule, "configure_model", lambda self: built.append(self))
    config = tmp_path / "method.yaml"
    config.write_text("model:\n  init_args:\n    method: nope\n")
    assert main(["params", "-c", str(VOC_RETINANET), "-c", str(config)]) == 2
    assert "unknown tuning method 'nope'" in capsys.readouterr().err and not built
