"""``monatune export`` end to end: a tiny run (or adapter + pretrained file, or adapter + task config) becomes
model.pt2 and model.onnx that ONNX Runtime runs with eager PyTorch's outputs, checked and timed in export.json
(issue 21, items 4 and 5)."""
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from run_cli import run_main

import monatune
from monatune.engine.module import TASK_HEAD_FILE, task_head_state

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SWIN = "swin_tiny_patch4_window7_224"
SWIN_KWARGS = {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "window_size": 4}
CLS_KWARGS = {**SWIN_KWARGS, "img_size": 32, "patch_size": 2}


def _run_onnx(folder: Path, x: torch.Tensor) -> list[torch.Tensor]:
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(None, {"image": x.numpy()})]


def _close(found: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def _passed_check(info: dict) -> None:
    check = info["check"]
    assert check["passed"] and check["max_relative_error"] < 1e-4 and len(check["cases"]) == 2
    assert set(info["timing"]["ratio_to_eager"]) == {"eager", "eager_folded", "pt2", "onnxruntime"}
    assert all(s > 0 for s in info["timing"]["median_seconds"].values())
    assert all(info["files"][f]["bytes"] == 0 or info["files"][f]["bytes"] > 1000 for f in ("model.pt2", "model.onnx"))
    assert info["machine"]["versions"]["onnxruntime"] == onnxruntime.__version__


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory) -> Path:
    """A one-step Mona fit of a tiny Swin on three colours (``monatune fit``)."""
    root = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
            folder = root / "data" / split / str(label)
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = np.asarray(colour) + rng.normal(0, 30, (32, 32, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    config = _write_yaml(root / "cls.yaml", {
        "trainer": {"max_epochs": 1, "limit_train_batches": 1, "accelerator": "cpu", "devices": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0},
        "model": {"class_path": "monatune.tasks.ImageClassifier", "init_args": {
            "backbone": SWIN, "model_kwargs": CLS_KWARGS, "method": "mona", "method_options": {"bottleneck": 8},
            "lr": 0.01}},
        "data": {"class_path": "monatune.data.ClassificationData", "init_args": {
            "root": str(root / "data"), "splits": ["train", "val", "val"], "batch_size": 6, "num_workers": 0,
            "image_size": 32, "resize_size": 32}},
    })  # fmt: skip
    assert run_main("fit", "-c", config, "--run_dir", root / "run") == 0
    return root / "run"


def test_classifier_from_a_run_directory(classification_run, tmp_path):
    out = tmp_path / "export"
    assert run_main("export", classification_run, out) == 0
    info = json.loads((out / "export.json").read_text())
    _passed_check(info)
    assert info["task"] == "classification" and info["method"] == "mona" and info["num_classes"] == 3
    assert info["folded"]["mona_modules"] == 8 and info["export_size"] == [32, 32]
    assert info["dynamic"] == {"batch": True, "image_size": False, "why_not": info["dynamic"]["why_not"]}
    assert "one size" in info["dynamic"]["why_not"]
    # the files against the network `monatune test` builds: the run's seed draws the base, the adapter goes on top
    torch.manual_seed(0)
    model = timm.create_model(SWIN, pretrained=False, num_classes=3, **CLS_KWARGS)
    monatune.load_adapter(model, classification_run / "adapter-best")
    x = torch.randn(3, 3, 32, 32)  # a batch size the export never saw
    with torch.no_grad():
        expected = model.eval()(x)
    _close(_run_onnx(out, x)[0], expected)
    _close(torch.export.load(out / "model.pt2").module()(x), expected)


def test_lora_vit_from_an_adapter_and_its_pretrained_file_with_dynamic_image_size(tmp_path, capsys):
    kwargs = {"depth": 1, "embed_dim": 64, "num_heads": 2, "img_size": 32, "dynamic_img_size": True}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, **kwargs)
    torch.save(model.state_dict(), tmp_path / "vit.pth")  # the "pretrained" file, in timm's layout
    monatune.apply(model, "lora", rank=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    monatune.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "export"
    assert run_main("export", tmp_path / "adapter", out, "--pretrained", tmp_path / "vit.pth",
                    "--model-kwargs", json.dumps(kwargs), "--runs", "1") == 0  # fmt: skip
    info = json.loads((out / "export.json").read_text())
    _passed_check(info)
    assert info["dynamic"]["image_size"] and info["input"]["shape"] == ["batch", 3, "height", "width"]
    assert [c["input_shape"] for c in info["check"]["cases"]] == [[2, 3, 32, 32], [1, 3, 64, 96]]
    x = torch.randn(1, 3, 48, 80)  # neither size the export or its check used
    with torch.no_grad():
        expected = model.eval()(x)
    _close(_run_onnx(out, x)[0], expected)

    # a check that fails (a tolerance no float32 export meets): exit 1 with the numbers, the files kept and marked
    assert run_main("export", tmp_path / "adapter", out, "--pretrained", tmp_path / "vit.pth", "--model-kwargs",
                    json.dumps(kwargs), "--dynamic-size", "no", "--tolerance", "1e-12", "--runs", "1") == 1  # fmt: skip
    assert "FAILED the check" in capsys.readouterr().err
    info = json.loads((out / "export.json").read_text())
    assert not info["check"]["passed"] and info["check"]["max_relative_error"] > 1e-12
    assert not info["dynamic"]["image_size"] and (out / "model.pt2").is_file() and (out / "model.onnx").is_file()


def _dense_adapter(tmp_path: Path, task, config: dict) -> Path:
    """A dense task's adapter directory, as a run saves it (adapter + task_head.safetensors), from its seeded build."""
    from safetensors.torch import save

    torch.manual_seed(0)  # the config's seed_everything (monatune's default, 0) draws the base
    task.configure_model()
    with torch.no_grad():
        for p in task.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    head = {TASK_HEAD_FILE: save(task_head_state(task.model, task.tuned))}
    monatune.save_adapter(task.tuned, tmp_path / "adapter", extra_files=head)
    _write_yaml(tmp_path / "task.yaml", config)
    return tmp_path / "adapter"


def test_segmenter_from_an_adapter_and_its_task_config(tmp_path):
    from monatune.tasks import SemanticSegmenter

    init = {"backbone": "vit_tiny_patch16_224", "model_kwargs": {"depth": 1, "embed_dim": 64, "num_heads": 2},
            "method": "mona", "method_options": {"bottleneck": 8}, "num_classes": 3, "channels": 16,
            "aux_channels": 8}  # fmt: skip
    adapter = _dense_adapter(tmp_path, SemanticSegmenter(**init), {
        "model": {"class_path": "monatune.tasks.SemanticSegmenter", "init_args": init},
        "data": {"class_path": "monatune.data.SegmentationData", "init_args": {"root": "elsewhere", "crop_size": [64, 64]}},
    })  # fmt: skip
    network = SemanticSegmenter(**init)
    torch.manual_seed(0)
    network.configure_model()
    monatune.load_adapter(network.tuned, adapter)
    from monatune.engine.module import load_task_head

    load_task_head(network.model, network.tuned, adapter)
    out = tmp_path / "export"
    # one size: a dense ViT captures with symbolic sizes, but slowly for a test
    assert run_main("export", adapter, out, "-c", tmp_path / "task.yaml", "--dynamic-size", "no", "--runs", "1") == 0
    info = json.loads((out / "export.json").read_text())
    _passed_check(info)
    assert info["task"] == "segmentation" and info["export_size"] == [64, 64]
    assert info["outputs"] == [{"name": "logits", "shape": ["batch", 3, 64, 64]}]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = network.model.eval()(x)["out"]
    _close(_run_onnx(out, x)[0], expected)


def test_detector_refused_whole_then_exported_as_backbone_and_fpn(tmp_path, capsys):
    from monatune.tasks import ObjectDetector

    init = {"backbone": SWIN, "model_kwargs": SWIN_KWARGS, "method": "lora", "method_options": {"rank": 4},
            "num_classes": 3, "detector": "retinanet", "fpn_channels": 16, "min_size": 64, "max_size": 96}  # fmt: skip
    adapter = _dense_adapter(tmp_path, ObjectDetector(**init), {
        "model": {"class_path": "monatune.tasks.ObjectDetector", "init_args": init},
        "data": {"class_path": "monatune.data.DetectionData", "init_args": {"root": "elsewhere"}},
    })  # fmt: skip
    out = tmp_path / "export"
    assert run_main("export", adapter, out, "-c", tmp_path / "task.yaml") == 2
    err = capsys.readouterr().err
    assert "retinanet detector cannot be exported" in err and "data-dependent" in err and "--features" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]

    assert run_main("export", adapter, out, "-c", tmp_path / "task.yaml", "--features", "--runs", "1") == 0
    info = json.loads((out / "export.json").read_text())
    _passed_check(info)
    assert info["export_size"] == [64, 64] and not info["dynamic"]["image_size"] and info["input"]["preprocess"]["size_divisor"] == 32
    assert [o["name"] for o in info["outputs"]] == [f"level_{i}" for i in range(5)]  # P3-P5, P6, P7
    detector = ObjectDetector(**init)
    torch.manual_seed(0)
    detector.configure_model()
    monatune.load_adapter(detector.tuned, adapter)
    from monatune.engine.module import load_task_head

    load_task_head(detector.model, detector.tuned, adapter)
    x = torch.randn(3, 3, 64, 64)  # a batch size the export never saw
    with torch.no_grad():
        expected = list(detector.model.eval().backbone(x).values())
    for found, want in zip(_run_onnx(out, x), expected, strict=True):
        _close(found, want)


def _nothing_written(parent: Path, out: Path) -> bool:
    return not out.exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_bad_inputs_are_refused_with_exit_2_and_nothing_written(classification_run, tmp_path, capsys):
    out = tmp_path / "export"
    assert run_main("export", tmp_path / "no-such-run", out) == 2
    assert "does not exist; give a run directory" in capsys.readouterr().err

    bare = tmp_path / "bare-run"  # a run stopped before its first epoch ended: a config, no adapter
    bare.mkdir()
    (bare / "config.yaml").write_text((classification_run / "config.yaml").read_text())
    assert run_main("export", bare, out) == 2
    assert "has no adapter-best/" in capsys.readouterr().err

    other = tmp_path / "other-task"  # a config whose model is not a monatune task
    other.mkdir()
    config = yaml.safe_load((classification_run / "config.yaml").read_text())
    config["model"] = {"class_path": "torch.nn.Identity"}
    _write_yaml(other / "config.yaml", config)
    (other / "adapter-best").symlink_to(classification_run / "adapter-best")
    assert run_main("export", other, out) == 2
    assert "not a monatune task" in capsys.readouterr().err

    assert _nothing_written(tmp_path, out)

    busy = tmp_path / "busy"  # a folder of other files is not replaced
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert run_main("export", classification_run, busy) == 2
    assert "holds other files (notes.txt)" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
