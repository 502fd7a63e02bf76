"""torchvision detectors on tuned dense backbones: FPN levels, losses, gradients, outputs."""
import pytest
import torch

import monatune

from monatune.models.detection.builders import DETECTORS, SimpleFeaturePyramid, build_detector, build_feature_backbone

SWIN = ("swin_tiny_patch4_window7_224", {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8), "window_size": 4})
VIT = ("vit_tiny_patch16_224", {"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 16, "img_size": 64})


def batch():
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = []
    for image, boxes, labels in ((images[0], [[5.0, 6, 40, 50]], [1]), (images[1], [[10.0, 10, 30, 60], [2, 3, 20, 20]], [2, 1])):
        masks = torch.zeros(len(boxes), *image.shape[-2:], dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes):
            m[int(y1):int(y2), int(x1):int(x2)] = 1
        targets.append({"boxes": torch.tensor(boxes), "labels": torch.tensor(labels), "masks": masks})
    return images, targets


def detector(kind, family, method="mona"):
    torch.manual_seed(0)
    name, kwargs = family
    return build_detector(kind, name, num_classes=2, method=method, method_options={"bottleneck": 8} if method == "mona" else None,
                          model_kwargs=kwargs, min_size=64, max_size=96)


@pytest.mark.parametrize("family", [SWIN, VIT], ids=["swin", "vit"])
@pytest.mark.parametrize("kind", ["retinanet", "fcos", "faster_rcnn", "mask_rcnn"])
def test_detector_trains_neck_heads_and_adapters_only(kind, family):
    model = detector(kind, family)
    images, targets = batch()
    losses = model(images, targets)
    expected = {
        "retinanet": {"classification", "bbox_regression"},
        "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
        "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
        "mask_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_mask"},
    }[kind]
    assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        in_body = name.startswith("backbone.body.")
        if in_body and not p.requires_grad:
            assert p.grad is None, name
        if not in_body:
            assert p.requires_grad, f"{name} (neck/head) must train"
    body_trainable = {n for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    adapters = tuple(f"{q}." for q, _, _ in monatune.adapter_modules(model.backbone.body))
    assert body_trainable and all(n.startswith(adapters) for n in body_trainable)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) >= {"boxes", "labels", "scores"}
    assert out[0]["boxes"].shape[-1] == 4 and (kind != "mask_rcnn" or out[0]["masks"].shape[-2:] == (64, 80))


@pytest.mark.parametrize("kind, strides", [("retinanet", [8, 16, 32, 64, 128]), ("faster_rcnn", [4, 8, 16, 32, 64])])
def test_fpn_levels_follow_the_release(kind, strides):
    for family in (SWIN, VIT):
        name, kwargs = family
        features = build_feature_backbone(name, detector=kind, model_kwargs=kwargs)
        maps = features(torch.rand(1, 3, 128, 128))
        assert [128 // m.shape[-1] for m in maps.values()] == strides
        assert all(m.shape[1] == 256 for m in maps.values())


def test_simple_feature_pyramid_scales():
    pyramid = SimpleFeaturePyramid(64)
    maps = pyramid(torch.rand(2, 64, 8, 8))
    assert [tuple(m.shape[1:]) for m in maps.values()] == [(16, 32, 32), (32, 16, 16), (64, 8, 8), (64, 4, 4)]
    assert pyramid.out_channels == [16, 32, 64, 64]


def test_training_lowers_the_loss_on_a_fixed_batch():
    model = detector("retinanet", SWIN)
    images, targets = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    totals = []
    for _ in range(12):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(float(loss))
    assert totals[-1] < 0.7 * totals[0], totals


def test_unknown_detector_is_refused():
    with pytest.raises(ValueError, match="unknown detector"):
        build_feature_backbone(SWIN[0], detector="yolo")
    assert "cascade_mask_rcnn" in DETECTORS
