"""The release's RetinaNet (mmdetection 2.11 RetinaHead) on torchvision's: classes, FPN P7, loss normalisation, inference."""
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from monatune.models.swin import freeze_stages
from monatune.models.detection.anchors import MMDetAnchorGenerator
from monatune.models.detection.assign import MaxIoUAssigner
from monatune.models.detection.builders import LastLevelP6P7NoReLU, build_detector
from monatune.models.detection.retinanet import MMDetRetinaNet

SWIN = {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8), "window_size": 4}


def retinanet(num_classes=3, **kw):
    torch.manual_seed(0)
    return build_detector("retinanet", "swin_tiny_patch4_window7_224", num_classes=num_classes, method="mona",
                          method_options={"bottleneck": 8}, model_kwargs=SWIN, min_size=64, max_size=96, **kw)  # fmt: skip


def test_sigmoid_classes_without_background_and_stages_1_to_3():
    model = retinanet(num_classes=3).eval()
    assert model.head.classification_head.cls_logits.out_channels == 9 * 3  # torchvision's builder gave 9 * 4
    body = model.backbone.body
    assert body.out_indices == [1, 2, 3] and not hasattr(body, "norm0") and hasattr(body, "norm3")
    assert isinstance(model.anchor_generator, MMDetAnchorGenerator) and model.anchor_generator.strides == [8, 16, 32, 64, 128]
    assert isinstance(model.proposal_matcher, MaxIoUAssigner) and model.proposal_matcher.min_pos_iou == 0.0
    assert model.detections_per_img == 100 and model.topk_candidates == 1000
    model.score_thresh = 0.0
    with torch.no_grad():
        out = model([torch.rand(3, 64, 80)])[0]
    assert len(out["labels"]) == 100 and out["labels"].min() >= 1 and out["labels"].max() <= 3


def test_p7_comes_from_p6_without_relu():
    torch.manual_seed(0)
    ours, theirs = LastLevelP6P7NoReLU(8, 4), LastLevelP6P7(8, 4)
    theirs.load_state_dict(ours.state_dict())
    c5 = torch.randn(1, 8, 16, 16)
    p, _ = ours([torch.zeros(1, 4, 16, 16)], [c5], ["p5"])
    torch.testing.assert_close(p[2], ours.p7(ours.p6(c5)))
    q, _ = theirs([torch.zeros(1, 4, 16, 16)], [c5], ["p5"])
    assert not torch.allclose(p[2], q[2])  # torchvision applies a ReLU to P6 first
    same = LastLevelP6P7NoReLU(4, 4)  # C5 as wide as the FPN: still P6 from C5 ("on_input"), not from P5
    c5, p5 = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    torch.testing.assert_close(same([p5], [c5], ["p5"])[0][1], same.p6(c5))
    fpn = retinanet().backbone.fpn
    assert isinstance(fpn.extra_blocks, LastLevelP6P7NoReLU)


def batch():
    images = [torch.rand(3, 64, 80), torch.rand(3, 64, 80)]  # one size: each image's features as when alone
    targets = [
        {"boxes": torch.tensor([[5.0, 6, 40, 50]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 10, 30, 60], [2, 3, 20, 20], [40, 30, 60, 70]]), "labels": torch.tensor([2, 1, 3])},
    ]
    return images, targets


def test_losses_are_divided_by_the_batchs_positives():
    """Hand case: image A has one positive and one negative anchor, image B two positives; logits 0 (p = 0.5)."""
    model = retinanet()
    model.transform.last_image_sizes = None  # anchors given by hand: no padding to leave out
    gt_a, gt_b = torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30]])
    targets = [{"boxes": gt_a, "labels": torch.tensor([1])}, {"boxes": gt_b, "labels": torch.tensor([2, 3])}]
    anchors = [torch.cat([gt_a, torch.tensor([[40.0, 40, 50, 50]])]), gt_b.clone()]
    head = {"cls_logits": torch.zeros(2, 2, 3), "bbox_regression": torch.stack([torch.ones(2, 4), 2 * torch.ones(2, 4)])}
    losses = model.compute_loss(targets, head, anchors)
    ln2 = torch.log(torch.tensor(2.0))
    pos, neg = 0.25 * 0.25 * ln2, 0.75 * 0.25 * ln2  # focal terms of a target 1 and a target 0 channel
    sum_a, sum_b = (pos + 2 * neg) + 3 * neg, 2 * (pos + 2 * neg)
    torch.testing.assert_close(losses["classification"], (sum_a + sum_b) / 3)  # torchvision: (sum_a / 1 + sum_b / 2) / 2
    torch.testing.assert_close(losses["bbox_regression"], torch.tensor((4.0 + 2 * 8.0) / 3))  # torchvision: 6


def test_inference_keeps_top_anchors_by_best_class_then_every_class_above_threshold():
    model = retinanet(num_classes=2)
    model.topk_candidates = 1
    anchors = [[torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30]])]]
    logit = lambda p: torch.logit(torch.tensor(p))  # noqa: E731
    head = {
        "cls_logits": [torch.stack([logit([0.9, 0.85]), logit([0.8, 0.01])])[None]],
        "bbox_regression": [torch.zeros(1, 2, 4)],
    }
    out = model.postprocess_detections(head, anchors, [(64, 64)])[0]
    # the anchor with the best class score stays, with both its classes; torchvision keeps only the best pair
    assert out["labels"].tolist() == [1, 2]
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.85]))
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.0, 0, 10, 10]] * 2))


def test_frozen_stages_freezes_the_patch_embedding_for_full_fine_tuning():
    model = build_detector("retinanet", "swin_tiny_patch4_window7_224", num_classes=3, method="full", model_kwargs=SWIN)
    body = model.backbone.body
    freeze_stages(body, 1)
    assert not any(p.requires_grad for p in body.patch_embed.parameters())
    assert all(p.requires_grad for p in body.layers.parameters())
    freeze_stages(body, 2)
    assert not any(p.requires_grad for p in body.layers[0].parameters())
    with pytest.raises(ValueError, match="dense Swin"):
        freeze_stages(nn.Linear(2, 2), 1)


def test_a_few_steps_lower_the_loss():
    model = retinanet()
    model.train()
    images, targets = batch()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03, momentum=0.9)
    totals = []
    for _ in range(20):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    assert totals[-1] < 0.7 * totals[0], totals


def test_anchors_over_another_images_padding_take_no_part():
    gen = MMDetAnchorGenerator((8, 16), (1.0,), scales=(4,))
    from torchvision.models.detection.image_list import ImageList

    gen(ImageList(torch.zeros(2, 3, 64, 96), [(64, 96), (40, 50)]), [torch.zeros(1, 1, 8, 12), torch.zeros(1, 1, 4, 6)])
    flags = gen.valid_flags((64, 64))  # the second image padded to 64 x 64 (size divisor 32)
    level0, level1 = flags[:96].reshape(8, 12), flags[96:].reshape(4, 6)
    assert level0[:, :8].all() and not level0[:, 8:].any()
    assert level1[:, :4].all() and not level1[:, 4:].any()
    model = retinanet()
    model.train()
    model.transform._skip_resize = True  # as ObjectDetector's data resize the training images themselves
    images, targets = batch()
    images[1] = torch.rand(3, 40, 50)  # padded to 64 x 64 on its own, to 64 x 96 in the batch
    model(images, targets)
    total = len(model.anchor_generator.valid_flags((64, 96)))
    assert int(model._valid_anchors(0, torch.device("cpu")).sum()) == total  # 64 x 80 pads to 64 x 96
    assert int(model._valid_anchors(1, torch.device("cpu")).sum()) < total
