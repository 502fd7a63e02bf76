"""``monatune fit`` for detection and segmentation on backbones other than Swin (issue 20): a tuned ConvNeXt
under RetinaNet on VOC, a tuned ResNet under UperNet on ADE20K, and a Hiera under Faster R-CNN through Python."""
import json

import yaml
from run_cli import run_main as run
from shapes_detection import CLASSES as BOX_CLASSES
from shapes_detection import write_voc
from shapes_segmentation import CLASSES as SEG_CLASSES
from shapes_segmentation import write_ade

import monatune
from monatune.models.detection.builders import build_detector

TRAINER = {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
           "enable_model_summary": False, "num_sanity_val_steps": 0, "log_every_n_steps": 1}  # fmt: skip
CONVNEXT = ("convnext_atto", {"dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1]})
RESNET = ("resnet18", {"layers": [1, 1, 1, 1]})


def _fit(tmp_path, config: dict) -> dict:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"trainer": TRAINER, **config}, sort_keys=False))
    run_dir = tmp_path / "run"
    assert run("fit", "-c", path, "--run_dir", run_dir) == 0
    return json.loads((run_dir / "results.json").read_text())


def test_retinanet_on_a_mona_tuned_convnext_fits_from_the_command_line(tmp_path):
    root = write_voc(tmp_path / "voc", n_train=4, n_test=2)
    name, kwargs = CONVNEXT
    results = _fit(tmp_path, {
        "model": {"class_path": "monatune.tasks.ObjectDetector", "init_args": {
            "backbone": name, "model_kwargs": kwargs, "detector": "retinanet", "method": "mona",
            "method_options": {"bottleneck": 8}, "lr": 1e-3, "fpn_channels": 32, "schedule": "constant"}},
        "data": {"class_path": "monatune.data.DetectionData", "init_args": {
            "root": str(root), "format": "voc", "splits": ["2007/trainval", "2007/test", "2007/test"],
            "classes": list(BOX_CLASSES), "train_scales": [64], "max_size": 96, "test_scale": 64, "num_workers": 0,
            "batch_size": 2}},
    })  # fmt: skip
    assert results["monitor"] == "val/voc_map50" and 0.0 <= results["best"] <= 1.0 and results["steps"] == 2
    counts = results["parameters"]
    assert counts["adapter"] > 0 and counts["trainable"] == counts["adapter"]  # the Monas, not the ConvNeXt


def test_upernet_on_a_mona_tuned_resnet_fits_from_the_command_line(tmp_path):
    root = write_ade(tmp_path / "ade", n_train=4, n_val=2)
    name, kwargs = RESNET
    results = _fit(tmp_path, {
        "model": {"class_path": "monatune.tasks.SemanticSegmenter", "init_args": {
            "backbone": name, "model_kwargs": kwargs, "method": "mona", "method_options": {"bottleneck": 8},
            "lr": 1e-3, "schedule": "poly", "channels": 32, "aux_channels": 16}},
        "data": {"class_path": "monatune.data.SegmentationData", "init_args": {
            "root": str(root), "classes": list(SEG_CLASSES), "batch_size": 2, "num_workers": 0, "crop_size": [48, 48],
            "scale": [128, 48]}},
    })  # fmt: skip
    assert results["monitor"] == "val/mIoU" and 0.0 <= results["best"] <= 1.0 and results["steps"] == 2
    counts = results["parameters"]
    assert counts["adapter"] > 0 and counts["trainable"] == counts["adapter"]  # the Monas, not the ResNet


def test_faster_rcnn_on_a_hiera_takes_its_four_stages():
    model = build_detector("faster_rcnn", "hiera_tiny_224", num_classes=3, method="mona", method_options={"bottleneck": 8},
                           model_kwargs={"embed_dim": 16, "num_heads": 1, "stages": (1, 1, 1, 1)}, min_size=64,
                           max_size=96, fpn_channels=32)  # fmt: skip
    body = model.backbone.body
    assert body.hierarchical and body.strides == [4, 8, 16, 32] and model.backbone.pyramid is None
    assert any(True for _ in monatune.adapter_modules(body))
