"""Rotated RetinaNet (monatune.models.oriented.retinanet): anchors, assignment, losses, inference, training."""
import math

import pytest
import torch
from rotated_retinanet_reference import RotatedAnchorGenerator, release_detections, release_loss
from torchvision.ops import box_iou

from monatune.models.detection.builders import LastLevelP6P7NoReLU
from monatune.models.oriented.coders import le90_to_oc, oc_to_le90
from monatune.models.oriented.gaussian import kld_loss
from monatune.models.oriented.retinanet import build_rotated_retinanet, circumscribed_xyxy
from monatune.ops import cxcywhr_to_le90, le90_to_cxcywhr, le90_to_polygons, polygon_iou

SWIN = {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8), "window_size": 4}
PI = math.pi
LN2 = math.log(2)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(num_classes=3, **kw):
    torch.manual_seed(0)
    kw.setdefault("fpn_channels", 32)
    return build_rotated_retinanet("swin_tiny_patch4_window7_224", num_classes=num_classes, method="mona",
                                   method_options={"bottleneck": 8}, model_kwargs=SWIN, **kw)  # fmt: skip


def xyxy(boxes):
    half = boxes[:, 2:4] / 2
    return torch.cat([boxes[:, :2] - half, boxes[:, :2] + half], dim=1)


def random_oc(n, g, height, width):
    """'oc' boxes: angle in (0, pi/2), sides 16..60 px, centres inside (height, width)."""
    centre = torch.rand(n, 2, generator=g) * torch.tensor([width - 16.0, height - 16.0]) + 8
    sides = 16 + torch.rand(n, 2, generator=g) * 44
    angle = 0.05 + torch.rand(n, 1, generator=g) * 1.45
    return torch.cat([centre, sides, angle], dim=1)


# ---------------------------------------------------------------- build
def test_build_backbone_neck_head():
    model = tiny(num_classes=3)
    assert model.backbone.body.out_indices == [1, 2, 3] and not hasattr(model.backbone.body, "norm0")
    assert isinstance(model.backbone.fpn.extra_blocks, LastLevelP6P7NoReLU)  # P6 from C5, P7 from P6 without ReLU
    head = model.head
    assert len(head.cls_convs) == len(head.reg_convs) == 4
    assert head.retina_cls.out_channels == 9 * 3 and head.retina_reg.out_channels == 9 * 5
    names = set(head.state_dict())  # the release's bbox_head.* names
    assert {"cls_convs.0.conv.weight", "reg_convs.3.conv.bias", "retina_cls.weight", "retina_reg.bias"} <= names
    assert head.retina_cls.bias.eq(-math.log(99)).all() and head.retina_reg.bias.eq(0).all()
    assert 0.008 < head.cls_convs[1].conv.weight.std().item() < 0.012  # Normal(std=0.01)
    assert model.coder.version == "oc" and not model.coder.edge_swap and not model.coder.proj_xy
    assert model.coder.stds == (1.0,) * 5
    for bad in ({"box_loss": "smooth_l1"}, {"num_classes": 0}, {"size_divisor": 0}, {"test_size": 0}):
        with pytest.raises(ValueError):
            tiny(**{"num_classes": 3, **bad})


# ---------------------------------------------------------------- anchors
def test_anchors_and_valid_flags_match_release_generator():
    model = tiny()
    sizes = [(8, 10), (4, 5), (2, 3), (1, 2), (1, 1)]
    ours = model.anchors(sizes, "cpu")
    reference = RotatedAnchorGenerator()
    theirs = reference.grid_priors(sizes)
    assert [len(a) for a in ours] == [8 * 10 * 9, 4 * 5 * 9, 2 * 3 * 9, 2 * 9, 9]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)  # base anchors: float32 products in another order
    # hand values: level 0, position (0, 0): ratios 1, 0.5, 2 (h / w), scales 4 * 2^(k/3) strides
    first = ours[0][:9]
    side = 32 * 2 ** (torch.arange(3) / 3)
    torch.testing.assert_close(first[:3, 2:4], torch.stack([side, side], 1))
    torch.testing.assert_close(first[3:6, 2], side * math.sqrt(2))  # ratio 0.5: wide
    torch.testing.assert_close(first[6:9, 3], side * math.sqrt(2))  # ratio 2: tall
    assert first[:, :2].eq(0).all() and first[:, 4].eq(0).all()
    torch.testing.assert_close(ours[1][9 * 6 + 2], torch.tensor([16.0, 16, 64 * 2 ** (2 / 3), 64 * 2 ** (2 / 3), 0]))
    for pad in [(64, 80), (32, 48), (40, 24)]:
        flags = model.anchor_generator.valid_flags(pad, "cpu")
        assert torch.equal(flags, torch.cat(reference.valid_flags(sizes, pad))), pad


# ---------------------------------------------------------------- assignment
def test_assignment_by_rotated_box_or_circumscribed_box():
    # a 64 x 16 bar at 45 degrees, and a 30 x 30 square far away
    gt = le90_to_oc(torch.tensor([[100.0, 100, 64, 16, PI / 4], [300, 300, 30, 30, 0]]))
    anchors = torch.tensor([[100.0, 100, 60, 60, 0], [100, 100, 32, 32, 0], [300, 300, 32, 32, 0],
                            [200, 100, 32, 32, 0]])  # fmt: skip
    # rotated IoU: big square 1024 / 3600 = 0.284; small square (the bar's band |x - y| <= 8 sqrt 2 cuts two
    # triangles of legs 32 - 8 sqrt 2 off it) 596.1 / 1451.9 = 0.4106; the far square 900 / 1024
    exact = polygon_iou(le90_to_polygons(oc_to_le90(gt).double()), le90_to_polygons(anchors.double()))
    band = 1024 - (32 - 8 * math.sqrt(2)) ** 2
    torch.testing.assert_close(exact[0, :2], torch.tensor([1024 / 3600, band / (2048 - band)], dtype=torch.float64))
    obb = tiny()
    assert obb.assign(anchors, gt).tolist() == [-1, 0, 1, -1]  # the small square: below 0.5, but the bar's best
    # circumscribed box: a 40 sqrt 2 square: 3200 / 3600 = 0.889 with the big anchor, 1024 / 3200 = 0.32 small
    r = 20 * math.sqrt(2)
    torch.testing.assert_close(circumscribed_xyxy(gt[:1]), torch.tensor([[100 - r, 100 - r, 100 + r, 100 + r]]))
    hbb = tiny(assign_by_circumhbbox=True)
    assert hbb.assign(anchors, gt).tolist() == [0, -1, 1, -1]
    assert hbb.assign(anchors, gt[:0]).tolist() == [-1] * 4  # no ground truth: all negative


# ---------------------------------------------------------------- losses
def hand_outputs(sizes, batch, k):
    cls = [torch.zeros(batch, 9 * k, h, w, requires_grad=True) for h, w in sizes]
    box = [torch.zeros(batch, 9 * 5, h, w, requires_grad=True) for h, w in sizes]
    return cls, box


@pytest.mark.parametrize("box_loss", ["l1", "kld"])
def test_targets_and_losses_hand_case(box_loss):
    """One 32 x 32 square (anchor-shaped) in a 32 x 32 image, an empty 32 x 64 image; logits and deltas 0."""
    model = tiny(num_classes=3, box_loss=box_loss)
    sizes = [(4, 8), (2, 4), (1, 2), (1, 1), (1, 1)]  # the 32 x 64 batch
    cls, box = hand_outputs(sizes, 2, 3)
    gt = torch.tensor([[16.0, 8, 32, 32, 0]])  # le90; 'oc' (16, 8, 32, 32, pi/2)
    no_labels = torch.zeros(0, dtype=torch.long)
    losses = model.compute_loss(cls, box, [gt, torch.zeros(0, 5)], [torch.tensor([1]), no_labels], [(32, 32), (32, 64)])
    generator = RotatedAnchorGenerator()
    anchors = torch.cat(generator.grid_priors(sizes))
    levels = torch.cat([torch.full((h * w * 9,), i) for i, (h, w) in enumerate(sizes)])
    valid = torch.cat(generator.valid_flags(sizes, (32, 32)))  # image 0: x < 32 only
    assert valid.sum() == (16 + 4 + 1 + 1 + 1) * 9
    iou = box_iou(torch.tensor([[0.0, -8, 32, 24]]), xyxy(anchors[valid]))[0]  # everything is axis-aligned here
    assert ((iou - 0.5).abs() > 1e-3).all() and ((iou - 0.4).abs() > 1e-3).all()
    positive, negative = iou >= 0.5, iou < 0.4
    n_pos, n_cared = int(positive.sum()), int((positive | negative).sum())
    # 6 at the square's own position (scales 1 and 2^(1/3) of each ratio; 0.397 at 2^(2/3)), 4 at each one 8 px away
    assert iou.max() == 1 and n_pos == 6 + 4 * 4
    # focal at p = 0.5: target 0 -> 0.75 * 0.5^2 * ln 2, target 1 -> 0.25 * 0.5^2 * ln 2; avg_factor = 12 + max(0, 1)
    neg_term, pos_term = 0.75 * 0.25 * LN2, 0.25 * 0.25 * LN2
    image1 = len(anchors) * 3 * neg_term  # every anchor of the empty image is a negative
    expected_cls = (n_cared * 3 * neg_term - n_pos * (neg_term - pos_term) + image1) / (n_pos + 1)
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(expected_cls), rtol=1e-5, atol=0)
    pos_anchors = anchors[valid][positive]
    if box_loss == "l1":  # |deltas| of the 'oc' target: da = pi/2 (the square's 'oc' angle), w and h swapped
        ax, ay, aw, ah = pos_anchors[:, :4].unbind(1)
        target = torch.stack([(16 - ax) / aw, (8 - ay) / ah, torch.log(32 / aw), torch.log(32 / ah),
                              torch.full_like(ax, PI / 2)], 1)  # fmt: skip
        torch.testing.assert_close(losses["loss_bbox"], target.abs().sum() / (n_pos + 1), rtol=1e-5, atol=0)
    else:  # decoded = anchors; mean per level, summed: no avg_factor
        per_box = kld_loss(pos_anchors, le90_to_oc(gt).expand(n_pos, 5))
        pos_levels = levels[valid][positive]
        assert pos_levels.unique().tolist() == [0]
        expected = per_box.mean()
        torch.testing.assert_close(losses["loss_bbox"], expected, rtol=1e-5, atol=0)
    sum(losses.values()).backward()
    assert box[0].grad.abs().sum() > 0 and box[2].grad.abs().sum() == 0  # no positive on level 2
    assert cls[0].grad[0, :, :, 4:].abs().sum() == 0  # image 0's anchors over the padding take no part
    assert cls[0].grad[1, :, :, 4:].abs().sum() > 0


@pytest.mark.parametrize("circumscribed, box_loss", [(False, "l1"), (True, "l1"), (True, "kld"), (False, "kld")])
def test_losses_match_release_transliteration(circumscribed, box_loss):
    model = tiny(num_classes=4, assign_by_circumhbbox=circumscribed, box_loss=box_loss)
    sizes = [(8, 10), (4, 5), (2, 3), (1, 2), (1, 1)]  # a 64 x 80 batch
    g = torch.Generator().manual_seed(3)
    cls = [torch.randn(3, 36, h, w, generator=g).requires_grad_() for h, w in sizes]
    box = [(torch.randn(3, 45, h, w, generator=g) * 0.3).requires_grad_() for h, w in sizes]
    gts = [random_oc(4, g, 64, 64), random_oc(3, g, 48, 80), torch.zeros(0, 5)]
    labels = [torch.randint(0, 4, (len(b),), generator=g) for b in gts]
    pads = [(64, 64), (64, 80), (32, 32)]
    ours = model.compute_loss(cls, box, [oc_to_le90(b) for b in gts], labels, pads)
    grads = torch.autograd.grad(sum(ours.values()), cls + box)
    ref_cls, ref_box = release_loss(cls, box, gts, labels, pads, num_classes=4, kld=box_loss == "kld",
                                    assign_by_circumhbbox="oc" if circumscribed else None)  # fmt: skip
    torch.testing.assert_close(ours["loss_cls"], ref_cls)
    torch.testing.assert_close(ours["loss_bbox"], ref_box, rtol=1e-5, atol=1e-6)
    ref_grads = torch.autograd.grad(ref_cls + ref_box, cls + box)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert ours["loss_bbox"] > 0


def test_kld_and_l1_variants_differ_only_in_the_box_loss():
    sizes = [(4, 4), (2, 2), (1, 1), (1, 1), (1, 1)]
    g = torch.Generator().manual_seed(4)
    cls = [torch.randn(1, 27, h, w, generator=g) for h, w in sizes]
    box = [torch.randn(1, 45, h, w, generator=g) * 0.2 for h, w in sizes]
    gt, labels = [oc_to_le90(random_oc(2, g, 32, 32))], [torch.tensor([0, 2])]
    l1 = tiny(box_loss="l1").compute_loss(cls, box, gt, labels, [(32, 32)])
    kld = tiny(box_loss="kld").compute_loss(cls, box, gt, labels, [(32, 32)])
    torch.testing.assert_close(l1["loss_cls"], kld["loss_cls"])
    assert not torch.isclose(l1["loss_bbox"], kld["loss_bbox"])


# ---------------------------------------------------------------- inference
def hand_level(h, w, k=3):
    return torch.full((9 * k, h, w), -10.0), torch.zeros(9 * 5, h, w)


def test_detections_hand_case_clamp_rescale_and_le90():
    model = tiny(num_classes=3)
    sizes = [(4, 4), (2, 2), (1, 1), (1, 1), (1, 1)]
    levels = [hand_level(h, w) for h, w in sizes]
    cls, box = levels[0]
    cls[1, 1, 3] = 4.0  # anchor 0 (32 x 32) at (24, 8), class 2
    box[0:5, 1, 3] = torch.tensor([0.5, 0.0, LN2, 0.0, 0.3])  # centre +16 px in x (clamped to W - 1), w x 2, +0.3 rad
    cls[3 * 6 + 0, 0, 0] = 3.0  # anchor 6 (ratio 2: 22.6 x 45.3) at (0, 0), class 1
    box[6 * 5 + 4, 0, 0] = -0.2  # 'oc' angle -0.2, h > w: le90 turns it by pi/2
    anchors = model.anchors(sizes, "cpu")
    outputs = [c for c, _ in levels], [b for _, b in levels]
    out = model._detections(*outputs, anchors, (32, 30), None)
    assert out["labels"].tolist() == [2, 1]
    torch.testing.assert_close(out["scores"], torch.sigmoid(torch.tensor([4.0, 3.0])))
    tall = 32 * math.sqrt(2)
    expected = torch.tensor([[29.0, 8, 64, 32, 0.3], [0, 0, tall, tall / 2, -0.2 + PI / 2]])
    torch.testing.assert_close(out["boxes"], expected)
    assert out["boxes"].dtype == torch.float32
    scaled = model._detections(*outputs, anchors, (32, 30), torch.tensor([0.5, 0.25, 0.5, 0.25]))
    torch.testing.assert_close(scaled["boxes"][0], torch.tensor([58.0, 32, 128, 128, 0.3]))  # w / 0.5, h / 0.25
    model.score_threshold = 0.96  # sigmoid(3) = 0.953 is out
    assert model._detections(*outputs, anchors, (32, 30), None)["labels"].tolist() == [2]


def test_detections_match_release_transliteration():
    model = tiny(num_classes=3, nms_pre=30, max_per_image=25)
    model.nms_iou = 0.3
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    g = torch.Generator().manual_seed(5)
    cls = [torch.randn(27, h, w, generator=g) - 1 for h, w in sizes]
    box = [torch.randn(45, h, w, generator=g) * 0.3 for h, w in sizes]
    ours = model._detections(cls, box, model.anchors(sizes, "cpu"), (60, 50), torch.tensor([0.5, 0.5, 0.5, 0.5]))
    dets, labels = release_detections(cls, box, (60, 50), [0.5, 0.5, 0.5, 0.5], num_classes=3, nms_pre=30,
                                      score_thr=0.05, iou_thr=0.3, max_per_img=25, rescale=True)  # fmt: skip
    assert len(ours["labels"]) == 25
    torch.testing.assert_close(ours["boxes"], cxcywhr_to_le90(le90_to_cxcywhr(dets[:, :5])))  # same rectangles in le90
    torch.testing.assert_close(ours["scores"], dets[:, 5])
    assert ours["labels"].tolist() == (labels + 1).tolist()


def test_output_contract_and_test_size():
    model = tiny(num_classes=3, score_threshold=0.0, nms_pre=100, max_per_image=20).eval()
    with torch.no_grad():
        model.head.retina_cls.bias.fill_(1.0)
        model.head.retina_reg.bias.normal_(0, 0.5)  # boxes of every shape and angle
        out = model([torch.rand(3, 48, 64), torch.rand(3, 40, 40)])
    for det in out:
        boxes, scores, labels = det["boxes"], det["scores"], det["labels"]
        assert boxes.shape == (20, 5) and scores.shape == labels.shape == (20,)
        assert boxes.dtype == scores.dtype == torch.float32 and labels.dtype == torch.int64
        assert labels.min() >= 1 and labels.max() <= 3
        assert (boxes[:, 2] >= boxes[:, 3]).all() and (boxes[:, 4] >= -PI / 2).all() and (boxes[:, 4] < PI / 2).all()
        assert (scores[:-1] >= scores[1:]).all()
    assert out[1]["boxes"][:, :2].max() <= 39  # centres clamped to the image
    image = torch.rand(3, 48, 64)
    small = torch.nn.functional.interpolate(image[None] * 255, size=(24, 32), mode="bilinear")[0]
    small = small.round().clamp(0, 255) / 255  # mmcv imrescale on uint8
    with torch.no_grad():
        direct = model([small])[0]
        model.test_size = 32
        mapped = model([image])[0]
    torch.testing.assert_close(mapped["boxes"][:, :4], direct["boxes"][:, :4] * 2)
    torch.testing.assert_close(mapped["scores"], direct["scores"])


# ---------------------------------------------------------------- training
def bar_image(cx, cy, w, h, theta, size=64):
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(int(cx * 7 + cy))) * 0.3
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
    v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
    image[:, (u.abs() < w / 2) & (v.abs() < h / 2)] = 0.9
    return image, {"boxes": torch.tensor([[cx, cy, w, h, theta]]), "labels": torch.tensor([1])}


@pytest.mark.parametrize("box_loss, circumscribed", [("l1", False), ("kld", True)])
def test_training_reduces_the_loss_and_reaches_the_tuned_backbone(box_loss, circumscribed):
    model = tiny(num_classes=2, box_loss=box_loss, assign_by_circumhbbox=circumscribed)
    scenes = [bar_image(30, 34, 40, 10, 0.5), bar_image(36, 30, 36, 12, -1.0), bar_image(32, 32, 30, 14, 1.3)]
    images, targets = [s[0] for s in scenes], [s[1] for s in scenes]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=1e-3)
    model.train()
    history, box_history = [], []
    for step in range(16):
        losses = model(images, targets)
        assert set(losses) == {"loss_cls", "loss_bbox"}
        total = sum(losses.values())
        optimiser.zero_grad()
        total.backward()
        if step == 0:
            named = dict(model.named_parameters())
            tuned = [n for n, p in named.items() if n.startswith("backbone.body") and p.requires_grad]  # Mona's
            assert tuned and all(named[n].grad is not None and named[n].grad.abs().sum() > 0 for n in tuned[-6:])
            for name in ("head.retina_cls.weight", "head.retina_reg.weight", "head.cls_convs.0.conv.weight",
                         "backbone.fpn.extra_blocks.p7.weight"):  # fmt: skip
                assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
        torch.nn.utils.clip_grad_norm_(trainable, 35)  # the release's grad_clip
        optimiser.step()
        history.append(total.item())
        box_history.append(losses["loss_bbox"].item())
    assert sum(history[-4:]) / 4 < 0.6 * sum(history[:3]) / 3, history
    assert sum(box_history[-4:]) / 4 < sum(box_history[:3]) / 3, box_history


def test_bad_targets_are_refused():
    model = tiny(num_classes=2)
    image = [torch.rand(3, 32, 32)]
    with pytest.raises(ValueError, match="labels must be in 1..2"):
        model(image, [{"boxes": torch.tensor([[5.0, 5, 4, 2, 0]]), "labels": torch.tensor([3])}])
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        model(image, [{"boxes": torch.tensor([[5.0, 5, 4, 2]]), "labels": torch.tensor([1])}])
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        model(image, [{"boxes": torch.tensor([[5.0, 5, 4, 2, 0]]), "labels": torch.tensor([1, 1])}])
    with pytest.raises(ValueError, match="positive w and h"):
        model(image, [{"boxes": torch.tensor([[5.0, 5, 0, 2, 0]]), "labels": torch.tensor([1])}])
    with pytest.raises(ValueError, match="one target per image"):
        model(image, [])


def test_empty_targets_and_autocast():
    model = tiny()
    empty = {"boxes": torch.zeros(0, 5), "labels": torch.zeros(0, dtype=torch.long)}
    target = {"boxes": torch.tensor([[16.0, 16, 20, 12, 0.2]]), "labels": torch.tensor([1])}
    losses = model([torch.rand(3, 32, 32)], [empty])
    assert losses["loss_bbox"].item() == 0 and losses["loss_cls"].item() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model([torch.rand(3, 32, 32), torch.rand(3, 32, 48)], [target, empty])
        model.eval()
        model.score_threshold = 0.0
        with torch.no_grad():
            out = model([torch.rand(3, 32, 32)])[0]
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert out["boxes"].dtype == out["scores"].dtype == torch.float32 and len(out["boxes"]) > 0
