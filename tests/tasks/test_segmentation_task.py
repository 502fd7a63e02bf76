"""SemanticSegmenter: trains through the data module on a generated ADE20K folder, whole and sliding
inference, mIoU checked by hand, and ``monatune fit | validate | predict`` end to end."""
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from run_cli import run_main
from shapes_segmentation import CLASSES, write_ade
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from monatune.data import SegmentationData
from monatune.tasks import SemanticSegmenter
from monatune.tasks.segmentation import slide_inference

BACKBONES = {
    "swin": ("swin_tiny_patch4_window7_224", {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8],
                                              "window_size": 4}),
    "vit": ("vit_tiny_patch16_224", {"depth": 2, "embed_dim": 64, "num_heads": 2}),
}  # fmt: skip
STEPS = 20


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    return write_ade(tmp_path_factory.mktemp("shapes") / "ade", n_train=4, n_val=3)


def data_module(root, **kwargs):
    options = dict(batch_size=4, num_workers=0, crop_size=(48, 48), scale=(128, 48), ratio_range=(1.0, 1.0),
                   cat_max_ratio=1.0, hflip=False, photometric=False, classes=list(CLASSES))  # fmt: skip
    return SegmentationData(str(root), **{**options, **kwargs})


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_segmenter_learns_and_evaluates_whole_and_sliding(ade_root, backbone):
    L.seed_everything(0)
    data = data_module(ade_root)
    name, model_kwargs = BACKBONES[backbone]
    model = SemanticSegmenter(name, model_kwargs=model_kwargs, method="mona", method_options={"bottleneck": 8},
                              lr=2e-3, channels=32, aux_channels=16, avg_non_ignore=True)  # fmt: skip
    recorder = LossRecorder()
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=STEPS + 1, callbacks=[recorder])  # fmt: skip
    trainer.fit(model, data)
    assert model.num_classes == 3 and model.classes == list(CLASSES)  # the ADE layout with its own class list
    assert model.crop == (48, 48) and model.stride == (32, 32)  # from the data; two thirds of the window
    losses = recorder.losses
    assert len(losses) == STEPS and sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses

    (whole,) = trainer.validate(model, data, verbose=False)
    model.inference = "slide"
    (slide,) = trainer.validate(model, data, verbose=False)
    for metrics in (whole, slide):
        assert set(metrics) == {"val/mIoU", "val/aAcc"} and all(0.0 < v <= 1.0 for v in metrics.values())
    assert whole != slide  # the windows see less context, so the predictions differ


def test_slide_inference_averages_overlapping_windows():
    seen = []

    def forward(crop):
        seen.append(tuple(crop.shape[-2:]))
        return torch.ones(1, 2, *crop.shape[-2:]) * crop.mean()

    image = torch.arange(10 * 13, dtype=torch.float32).reshape(1, 1, 10, 13)
    logits = slide_inference(forward, image, 2, crop=(6, 6), stride=(4, 4))
    # mmsegmentation's grid: rows ceil((10 - 6) / 4) + 1 = 2, columns ceil((13 - 6) / 4) + 1 = 3; windows
    # that would overrun the image are moved back inside it
    assert seen == [(6, 6)] * 6 and logits.shape == (1, 2, 10, 13)
    windows = [(y, x) for y in (0, 4) for x in (0, 4, 7)]
    expected = torch.zeros(10, 13)
    count = torch.zeros(10, 13)
    for y, x in windows:
        expected[y : y + 6, x : x + 6] += image[0, 0, y : y + 6, x : x + 6].mean()
        count[y : y + 6, x : x + 6] += 1
    assert torch.allclose(logits[0, 0], expected / count)
    small = slide_inference(forward, image[:, :, :4, :5], 2, crop=(6, 6), stride=(4, 4))  # smaller than a window
    assert seen[-1] == (4, 5) and small.shape == (1, 2, 4, 5)


def test_miou_and_pixel_accuracy_match_a_hand_computed_case():
    """Two images scored together (a data-set-level confusion matrix), label 255 ignored, classes absent
    from both prediction and ground truth left out of the mean, a class only predicted counted as 0."""
    iou = MulticlassJaccardIndex(4, average="macro", ignore_index=255)  # what SemanticSegmenter uses
    acc = MulticlassAccuracy(4, average="micro", ignore_index=255)
    target_a, pred_a = torch.tensor([[0, 0, 1, 255]]), torch.tensor([[0, 1, 1, 2]])
    target_b, pred_b = torch.tensor([[1, 1, 0, 0]]), torch.tensor([[1, 2, 0, 0]])
    for pred, target in ((pred_a, target_a), (pred_b, target_b)):
        iou.update(pred, target)
        acc.update(pred, target)
    # scored pixels: a0..a2, b0..b3 (a3 is ignored, its prediction 2 does not count)
    # class 0: target {a0, a1, b2, b3}, pred {a0, b2, b3}: I 3, U 4 -> 0.75
    # class 1: target {a2, b0, b1}, pred {a1, a2, b0}: I 2, U 4 -> 0.5
    # class 2: target {}, pred {b1}: I 0, U 1 -> 0; class 3: absent from both -> left out
    assert float(iou.compute()) == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    # per image and averaged it would be ((1/2 + 1/2) / 2 + (1 + 1/2 + 0) / 3) / 2 = 0.5: a different number
    assert float(iou.compute()) != pytest.approx(0.5)
    assert float(acc.compute()) == pytest.approx(5 / 7)  # a0 a2 b0 b2 b3 right of 7 scored pixels


def test_fit_validate_predict_from_the_command_line(ade_root, tmp_path):
    name, model_kwargs = BACKBONES["swin"]
    config = {
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0, "log_every_n_steps": 1},
        "model": {"class_path": "monatune.tasks.SemanticSegmenter", "init_args": {
            "backbone": name, "model_kwargs": model_kwargs, "method": "lora", "method_options": {"rank": 4},
            "lr": 1e-3, "schedule": "poly", "warmup_steps": 1, "channels": 32, "aux_channels": 16,
            "inference": "slide"}},
        "data": {"class_path": "monatune.data.SegmentationData", "init_args": {
            "root": str(ade_root), "classes": list(CLASSES), "batch_size": 2, "num_workers": 0, "crop_size": [48, 48],
            "scale": [128, 48]}},
    }  # fmt: skip
    path = tmp_path / "ade.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    run_dir = tmp_path / "run"
    assert run_main("fit", "-c", path, "--run_dir", run_dir) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["monitor"] == "val/mIoU" and 0.0 <= results["best"] <= 1.0 and results["steps"] == 4
    assert results["parameters"]["task_head"] > 0 and (run_dir / "adapter-best" / "task_head.safetensors").is_file()

    assert run_main("validate", "-c", path, "--run_dir", run_dir) == 0
    metrics = json.loads((run_dir / "validate" / "results.json").read_text())["metrics"]
    assert metrics["val/mIoU"] == pytest.approx(results["best"], abs=1e-6)  # adapter-best and heads reloaded

    images = ade_root / "ADEChallengeData2016" / "images" / "validation"
    assert run_main("predict", "-c", path, "--run_dir", run_dir, "--data.init_args.predict_path", images) == 0
    rows = json.loads((run_dir / "predict" / "predictions.json").read_text())
    assert len(rows) == 3
    for row in rows:
        with Image.open(row["path"]) as im, Image.open(row["mask"]) as mask:
            assert mask.size == im.size and np.asarray(mask).max() < 3  # the predicted classes, image-sized
        assert sum(c["fraction"] for c in row["classes"]) == pytest.approx(1.0, abs=1e-3)
        assert {c["name"] for c in row["classes"]} <= set(CLASSES)
    overlays = sorted((run_dir / "predict" / "pictures").glob("*.png"))
    assert len(overlays) == 3
    with Image.open(overlays[0]) as overlay, Image.open(rows[0]["path"]) as original:
        assert overlay.size == original.size
        assert np.abs(np.asarray(overlay, dtype=int) - np.asarray(original.convert("RGB"), dtype=int)).max() > 40
