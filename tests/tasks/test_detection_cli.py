"""``monatune fit | validate | test | predict`` on generated COCO and VOC folders, as a user runs them."""
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from shapes_detection import CLASSES, write_coco, write_voc

from run_cli import run_main as run

SWIN = "swin_tiny_patch4_window7_224"
SWIN_KWARGS = {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "window_size": 4}
SMALL_RCNN = {"rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 100,
              "rpn_post_nms_top_n_test": 50, "rpn_batch_size_per_image": 64, "box_batch_size_per_image": 64}
W, H = 128, 96  # the generated images' size


def write_config(path: Path, model: dict, data: dict, epochs: int) -> Path:
    config = {
        "trainer": {"max_epochs": epochs, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0, "log_every_n_steps": 1},
        "model": {"class_path": "monatune.tasks.ObjectDetector", "init_args": {
            "backbone": SWIN, "model_kwargs": SWIN_KWARGS, "method": "mona", "method_options": {"bottleneck": 8},
            "lr": 1e-3, "fpn_channels": 32, "schedule": "constant", **model}},
        "data": {"class_path": "monatune.data.DetectionData", "init_args": {"num_workers": 0, "batch_size": 2, **data}},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_coco_cascade_mask_rcnn_fit_validate_predict(tmp_path):
    root = write_coco(tmp_path / "coco", n_train=4, n_val=3)
    pretrained = tmp_path / "tiny_swin.pth"  # a timm-format Swin file, loaded into the detector's backbone
    torch.save(timm.create_model(SWIN, pretrained=False, **SWIN_KWARGS).state_dict(), pretrained)
    config = write_config(
        tmp_path / "coco.yaml",
        {"detector": "cascade_mask_rcnn", "pretrained": str(pretrained),
         "detector_kwargs": {**SMALL_RCNN, "head_channels": 32, "score_average": "logits", "box_score_thresh": 0.0}},
        {"root": str(root), "format": "coco", "splits": ["train", "val", "val"], "train_scales": [56, 64],
         "max_size": 96, "test_scale": 64, "crop_scales": [64], "crop_range": [40, 56]},
        epochs=2,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    assert run("fit", "-c", config, "--run_dir", run_dir) == 0
    results = read_json(run_dir / "results.json")
    assert results["monitor"] == "val/map" and 0.0 <= results["best"] <= 1.0 and results["steps"] == 4
    assert results["method"] == "mona" and 0 < results["parameters"]["trainable"] < results["parameters"]["total"]
    assert results["parameters"]["task_head"] > 0  # the FPN and the cascade heads
    for name in ("adapter_model.safetensors", "task_head.safetensors"):
        assert (run_dir / "adapter-best" / name).is_file()

    # validate reloads adapter-best (adapters, FPN and heads) and reports box and mask AP
    assert run("validate", "-c", config, "--run_dir", run_dir) == 0
    metrics = read_json(run_dir / "validate" / "results.json")["metrics"]
    assert {"val/map", "val/map_50", "val/segm_map", "val/segm_map_50"} <= set(metrics)
    assert metrics["val/map"] == pytest.approx(results["best"], abs=1e-6)  # the best epoch's AP again

    # predict draws boxes, labels and masks on the images, in their own pixels
    assert run("predict", "-c", config, "--run_dir", run_dir, "--data.init_args.predict_path", root / "val",
               "--model.init_args.predict_threshold", "0.0") == 0  # fmt: skip
    rows = read_json(run_dir / "predict" / "predictions.json")
    assert [Path(r["path"]).name for r in rows] == [f"val_{i:04d}.jpg" for i in (1, 2, 3)]
    assert sum(len(r["boxes"]) for r in rows) > 0
    for row in rows:
        assert len(row["boxes"]) == len(row["labels"]) == len(row["scores"]) == len(row["masks"]) == len(row["names"])
        assert all(0 <= x1 <= x2 <= W and 0 <= y1 <= y2 <= H for x1, y1, x2, y2 in row["boxes"])
        assert set(row["names"]) <= set(CLASSES) and row["scores"] == sorted(row["scores"], reverse=True)
        assert all(m["size"] == [H, W] for m in row["masks"])
        mask_utils.decode([{**m, "counts": m["counts"].encode()} for m in row["masks"]])  # valid RLEs
    pictures = sorted((run_dir / "predict" / "pictures").glob("*.png"))
    assert len(pictures) == 3
    drawn = np.asarray(Image.open(pictures[0]).convert("RGB"), dtype=int)
    original = np.asarray(Image.open(rows[0]["path"]).convert("RGB"), dtype=int)
    assert drawn.shape == original.shape == (H, W, 3)
    if rows[0]["boxes"]:
        assert np.abs(drawn - original).max() > 60  # box outlines and masks are drawn on it


def test_voc_retinanet_fit_and_test_score_voc_map(tmp_path):
    root = write_voc(tmp_path / "voc", n_train=4, n_test=3)
    config = write_config(
        tmp_path / "voc.yaml", {"detector": "retinanet"},
        {"root": str(root), "format": "voc", "splits": ["2007/trainval", "2007/test", "2007/test"],
         "classes": list(CLASSES), "train_scales": [64], "max_size": 96, "test_scale": 64, "repeats": 2},
        epochs=1,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    assert run("fit", "-c", config, "--run_dir", run_dir) == 0
    results = read_json(run_dir / "results.json")
    assert results["monitor"] == "val/voc_map50" and 0.0 <= results["best"] <= 1.0
    assert results["steps"] == 4  # two passes over the four trainval images, two per step

    assert run("test", "-c", config, "--run_dir", run_dir) == 0
    metrics = read_json(run_dir / "test" / "results.json")["metrics"]
    assert set(metrics) == {"test/voc_map50"} and metrics["test/voc_map50"] == pytest.approx(results["best"], abs=1e-6)
