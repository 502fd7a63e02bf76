"""Every detector trains through the data pipeline on a generated COCO folder (JPEG + JSON) and is evaluated.

Tiny Swin and tiny ViT backbones (Mona-tuned), images resized to 64 pixels, FPN and heads 32 wide, so
that each of the ten fits takes seconds on a CPU. Augmentation is off and the four training images
make one batch, so every step sees the same data and the loss must fall.
"""
import lightning as L
import pytest
import torch
from shapes_detection import CLASSES, write_coco

from monatune.data import DetectionData
from monatune.metrics.coco import COCO_STATS
from monatune.tasks import ObjectDetector

BACKBONES = {
    "swin": ("swin_tiny_patch4_window7_224", {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8),
                                              "window_size": 4}),
    "vit": ("vit_tiny_patch16_224", {"depth": 2, "embed_dim": 96, "num_heads": 3}),
}  # fmt: skip
SMALL_RCNN = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                  rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64, box_batch_size_per_image=64)  # fmt: skip
DETECTOR_KWARGS = {
    # mask_rcnn: torchvision's mask head is 256 wide whatever the FPN, so it samples fewer RoIs to stay fast
    "retinanet": {}, "fcos": {}, "faster_rcnn": SMALL_RCNN, "mask_rcnn": {**SMALL_RCNN, "box_batch_size_per_image": 16},
    "cascade_mask_rcnn": {**SMALL_RCNN, "head_channels": 32},
}  # fmt: skip
STEPS = 16


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("shapes") / "coco", n_train=4, n_val=4)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("detector", list(DETECTOR_KWARGS))
def test_detector_learns_from_a_coco_folder_and_is_evaluated(coco_root, detector, backbone):
    L.seed_everything(0)
    data = DetectionData(str(coco_root), splits=("train", "val", "val"), batch_size=4, num_workers=0,
                         train_scales=[64], max_size=96, test_scale=64, crop=False, hflip=False)  # fmt: skip
    name, model_kwargs = BACKBONES[backbone]
    model = ObjectDetector(name, detector=detector, model_kwargs=model_kwargs, method="mona",
                           method_options={"bottleneck": 8}, lr=1e-3, fpn_channels=32,
                           detector_kwargs=DETECTOR_KWARGS[detector])  # fmt: skip
    recorder = LossRecorder()
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=STEPS + 1, callbacks=[recorder])  # fmt: skip
    trainer.fit(model, data)

    # the data module set the model up: classes, the evaluation size, no second resize in training
    assert model.num_classes == len(CLASSES) and model.classes == list(CLASSES)
    assert (model.min_size, model.max_size, model.metric) == (64, 96, "coco")
    assert model.model.transform._skip_resize and model.model.transform.min_size == (64,)
    losses = recorder.losses
    assert len(losses) == STEPS and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, losses

    # evaluation end to end: COCO box (and mask) AP of the four validation images
    (metrics,) = trainer.validate(model, data, verbose=False)
    keys = {f"val/{name}" for name in COCO_STATS}  # COCOeval's twelve statistics
    if detector in ("mask_rcnn", "cascade_mask_rcnn"):
        keys |= {f"val/segm_{name}" for name in COCO_STATS}
    assert set(metrics) == keys and all(0.0 <= v <= 1.0 or v == -1.0 for v in metrics.values())  # -1: no object of a size
    assert metrics["val/map_50"] >= metrics["val/map"] >= 0.0
