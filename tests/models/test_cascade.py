"""Cascade Mask R-CNN on torchvision's parts: losses, stage weights, training, inference, scores, coders, GIoU."""
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops import FeaturePyramidNetwork, generalized_box_iou_loss
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from monatune.models.detection.cascade import (
    RELEASE_BBOX_REG_WEIGHTS,
    CascadeBoxPredictor,
    CascadeMaskHead,
    CascadeMaskRCNN,
    cascade_box_loss,
)
from monatune.models.detection.anchors import MMDetAnchorGenerator
from monatune.models.detection.assign import MaxIoUAssigner
from monatune.models.detection.roi import LevelRoIAlign

NUM_CLASSES = 3  # background + 2


@pytest.fixture(autouse=True)
def _one_thread():
    # roi_align's CPU backward is several times slower with more than one thread on these tiny inputs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyBackbone(nn.Module):
    """Two strided convs (strides 4, 8) and an FPN of 32 channels with a max-pooled extra level."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, channels, 3, 4, 1), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 3, 2, 1), nn.ReLU())
        self.fpn = FeaturePyramidNetwork([channels, channels], 32, extra_blocks=LastLevelMaxPool())
        self.out_channels = 32

    def forward(self, x):
        c1 = self.conv1(x)
        return self.fpn(OrderedDict([("0", c1), ("1", self.conv2(c1))]))


def tiny_model(**kwargs):
    torch.manual_seed(0)
    names = ["0", "1"]
    options = dict(
        min_size=64, max_size=96,
        rpn_anchor_generator=AnchorGenerator(((8,), (16,), (32,)), ((0.5, 1.0, 2.0),) * 3),
        rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
        box_roi_pool=LevelRoIAlign(names, 7, (4, 8)), mask_roi_pool=LevelRoIAlign(names, 14, (4, 8)),
        box_heads=[FastRCNNConvFCHead((32, 7, 7), [16], [64], norm_layer=nn.BatchNorm2d) for _ in range(3)],
        box_predictors=[CascadeBoxPredictor(64, NUM_CLASSES) for _ in range(3)],
        box_batch_size_per_image=64,
        mask_heads=[CascadeMaskHead(32, NUM_CLASSES, channels=16, num_convs=1) for _ in range(3)],
    )
    options.update(kwargs)
    return CascadeMaskRCNN(TinyBackbone(), NUM_CLASSES, **options)


def batch():
    torch.manual_seed(1)
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = []
    for image, boxes, labels in ((images[0], [[5.0, 6, 40, 50]], [1]), (images[1], [[10.0, 10, 30, 60], [2, 3, 20, 20]], [2, 1])):
        masks = torch.zeros(len(boxes), *image.shape[-2:], dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes):
            m[int(y1):int(y2), int(x1):int(x2)] = 1
        targets.append({"boxes": torch.tensor(boxes), "labels": torch.tensor(labels), "masks": masks})
    return images, targets


def losses_of(model, seed=0):
    images, targets = batch()
    torch.manual_seed(seed)  # the RPN's and each stage's sampling
    return model(images, targets)


def test_training_returns_every_loss_finite():
    losses = losses_of(tiny_model())
    stages = {f"loss_{k}_s{t}" for k in ("classifier", "box_reg", "mask") for t in range(3)}
    assert set(losses) == stages | {"loss_objectness", "loss_rpn_box_reg"}
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), name



def test_every_stage_and_head_gets_gradients():
    model = tiny_model()
    sum(losses_of(model).values()).backward()
    heads = model.roi_heads
    parts = {f"stages.{t}.predictor.bbox_pred": s.predictor.bbox_pred for t, s in enumerate(heads.stages)}
    parts |= {f"stages.{t}.head": s.head for t, s in enumerate(heads.stages)}
    parts |= {f"mask_heads.{t}": m for t, m in enumerate(heads.mask_heads)}
    parts |= {"rpn.head": model.rpn.head, "backbone": model.backbone}
    for name, module in parts.items():
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name


def test_stage_loss_weights_scale_each_stage():
    weighted = losses_of(tiny_model())  # release: 1 / 0.5 / 0.25
    plain = losses_of(tiny_model(stage_loss_weights=(1.0, 1.0, 1.0)))
    for t, w in enumerate((1.0, 0.5, 0.25)):
        for kind in ("classifier", "box_reg", "mask"):
            key = f"loss_{kind}_s{t}"
            assert plain[key] > 0
            torch.testing.assert_close(weighted[key], w * plain[key])


def test_giou_weight_scales_box_losses_only():
    base = losses_of(tiny_model())
    half = losses_of(tiny_model(box_loss_weight=5.0))
    for t in range(3):
        torch.testing.assert_close(half[f"loss_box_reg_s{t}"], base[f"loss_box_reg_s{t}"] / 2)
        torch.testing.assert_close(half[f"loss_classifier_s{t}"], base[f"loss_classifier_s{t}"])


def test_training_steps_reduce_the_loss():
    model = tiny_model()
    images, targets = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    totals = []
    for step in range(40):
        torch.manual_seed(step)
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    assert sum(totals[-5:]) / 5 < 0.5 * totals[0], totals


def test_eval_returns_boxes_labels_scores_masks():
    model = tiny_model(box_score_thresh=0.0, box_detections_per_img=20).eval()
    images, _ = batch()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for image, d in zip(images, detections):
        n = len(d["boxes"])
        assert 0 < n <= 20
        h, w = image.shape[-2:]
        assert d["boxes"].shape == (n, 4) and d["labels"].shape == (n,) and d["scores"].shape == (n,)
        assert d["masks"].shape == (n, 1, h, w)
        assert d["labels"].dtype == torch.int64 and ((d["labels"] >= 1) & (d["labels"] < NUM_CLASSES)).all()
        assert (d["boxes"][:, 0::2] <= w).all() and (d["boxes"][:, 1::2] <= h).all() and (d["boxes"] >= 0).all()
        assert ((d["masks"] >= 0) & (d["masks"] <= 1)).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all()


class ConstantPredictor(nn.Module):
    """Same logits and box deltas for every RoI."""

    def __init__(self, logits, deltas=(0.0, 0.0, 0.0, 0.0)):
        super().__init__()
        self.logits, self.deltas = torch.tensor(logits), torch.tensor(deltas)

    def forward(self, x):
        n = x.shape[0]
        return self.logits.expand(n, -1), self.deltas.expand(n, -1)


STAGE_LOGITS = ([0.0, 2.0, 0.0], [0.0, -1.0, 3.0], [1.0, 0.5, 0.5])


@pytest.mark.parametrize("average", ["probs", "logits"])
def test_final_scores_average_the_stages(average):
    model = tiny_model(box_score_thresh=0.0, score_average=average).eval()
    for stage, logits in zip(model.roi_heads.stages, STAGE_LOGITS):
        stage.predictor = ConstantPredictor(logits)
    logits = torch.tensor(STAGE_LOGITS)
    if average == "probs":
        expected = logits.softmax(-1).mean(0)
    else:
        expected = logits.mean(0).softmax(-1)
    assert not torch.allclose(logits.softmax(-1).mean(0), logits.mean(0).softmax(-1))  # the two averages differ
    with torch.no_grad():
        detections = model(batch()[0])
    for d in detections:
        assert set(d["labels"].tolist()) == {1, 2}
        torch.testing.assert_close(d["scores"], expected[d["labels"]])


def test_inference_refines_boxes_stage_after_stage():
    model = tiny_model().eval()
    deltas = (0.5, 0.0, 0.0, 0.0)  # shift right by 0.5 * width / weight_x at each stage
    for stage in model.roi_heads.stages:
        stage.predictor = ConstantPredictor([0.0, 5.0, 0.0], deltas)
    heads = model.roi_heads
    images = torch.rand(1, 3, 64, 64)
    features = model.backbone(images)
    proposal = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    with torch.no_grad():
        result, _ = heads(features, [proposal], [(64, 64)])
    expected = proposal.clone()
    for weights in RELEASE_BBOX_REG_WEIGHTS:
        expected = expected + 0.5 * (expected[:, 2] - expected[:, 0]) / weights[0] * torch.tensor([1.0, 0, 1, 0])
    torch.testing.assert_close(result[0]["boxes"], expected)
    # 20 px wide: 20 * 0.5 * (1/10 + 1/20 + 0.033) = 1.83 px in all
    torch.testing.assert_close(expected[0, 0], torch.tensor(10.0 + 10 * (0.1 + 0.05 + 0.033)))


def test_each_stage_matches_at_its_own_iou():
    model = tiny_model(box_batch_size_per_image=1000, box_positive_fraction=1.0)
    heads = model.roi_heads
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    target = {"boxes": gt, "labels": torch.tensor([2])}
    # IoUs with the gt box: 0.55, 0.65, 0.75, 0.2
    boxes = torch.tensor([[0.0, 0.0, 10.0, 5.5], [0.0, 0.0, 10.0, 6.5], [0.0, 0.0, 10.0, 7.5], [0.0, 0.0, 10.0, 2.0]])
    expected = {0: [2, 2, 2, 0], 1: [0, 2, 2, 0], 2: [0, 0, 2, 0]}
    for t, stage in enumerate(heads.stages):
        rois, is_gt, _, labels, matched = heads._sample(stage, [boxes], [target])
        order = [torch.where((rois[0] == b).all(1))[0].item() for b in torch.cat([boxes, gt])]
        assert labels[0][order].tolist() == expected[t] + [2]  # the gt box itself is always a positive
        assert is_gt[0][order].tolist() == [False] * 4 + [True]
        torch.testing.assert_close(matched[0], gt.expand(len(rois[0]), 4))


def test_later_stages_get_refined_boxes_without_gt_copies(monkeypatch):
    model = tiny_model()
    heads = model.roi_heads
    seen = []
    sample = heads._sample

    def spy(stage, boxes, targets):
        out = sample(stage, boxes, targets)
        seen.append(([len(b) for b in boxes], [int(g.sum()) for g in out[1]], [len(r) for r in out[0]]))
        return out

    monkeypatch.setattr(heads, "_sample", spy)
    losses_of(model)
    assert len(seen) == 3
    for (_, gt_prev, kept_prev), (inputs, _, _) in zip(seen, seen[1:]):
        assert inputs == [k - g for k, g in zip(kept_prev, gt_prev)]


def test_defaults_are_the_release_configuration():
    model = CascadeMaskRCNN(TinyBackbone(), 81)
    heads = model.roi_heads
    assert [s.iou_threshold for s in heads.stages] == [0.5, 0.6, 0.7]
    matchers = [s.proposal_matcher for s in heads.stages]
    assert [(m.high_threshold, m.low_threshold, m.allow_low_quality_matches) for m in matchers] == [
        (0.5, 0.5, False), (0.6, 0.6, False), (0.7, 0.7, False)
    ]
    assert [s.loss_weight for s in heads.stages] == [1.0, 0.5, 0.25]
    weights = [s.box_coder.weights for s in heads.stages]
    assert weights[0] == (10.0, 10.0, 5.0, 5.0) and weights[1] == (20.0, 20.0, 10.0, 10.0)
    assert weights[2] == pytest.approx((1 / 0.033, 1 / 0.033, 1 / 0.067, 1 / 0.067))
    assert weights[2] == pytest.approx((30.303, 30.303, 14.925, 14.925), abs=1e-3)
    assert (heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction) == (512, 0.25)
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img, heads.box_loss_weight) == (0.05, 0.5, 100, 10.0)
    for pool, size in ((heads.box_roi_pool, 7), (heads.mask_roi_pool, 14)):  # mmcv RoIAlign: aligned, adaptive
        assert isinstance(pool, LevelRoIAlign) and pool.output_size == (size, size) and pool.sampling_ratio == 0
        assert pool.strides == [4, 8, 16, 32] and pool.finest_scale == 56
    for stage in heads.stages:  # "4conv1fc": four 3x3 convs of 256 with a norm, one fc of 1024, boxes per class
        convs = [m for m in stage.head.modules() if isinstance(m, nn.Conv2d)]
        assert [(c.out_channels, c.kernel_size) for c in convs] == [(256, (3, 3))] * 4
        assert sum(isinstance(m, nn.BatchNorm2d) for m in stage.head.modules()) == 4
        assert [m.out_features for m in stage.head.modules() if isinstance(m, nn.Linear)] == [1024]
        assert (stage.predictor.cls_score.out_features, stage.predictor.bbox_pred.out_features) == (81, 320)
    assert len(heads.mask_heads) == 3  # FCNMaskHead per stage: 80 mask channels, no background
    assert all(m.predictor.mask_fcn_logits.out_channels == 80 for m in heads.mask_heads)
    assert heads.score_average == "logits"
    # the RPN: mmdet's anchors and assigner, anchors over the border left out of training
    rpn = model.rpn
    assert isinstance(rpn.anchor_generator, MMDetAnchorGenerator) and rpn.anchor_generator.strides == [4, 8, 16, 32, 64]
    m = rpn.proposal_matcher
    assert isinstance(m, MaxIoUAssigner) and (m.pos_iou_thr, m.neg_iou_thr, m.min_pos_iou) == (0.7, 0.3, 0.3)
    assert rpn.allowed_border == 0 and rpn.min_size == 0
    # mmdet's ConvFCBBoxHead initialises its fc Xavier-uniform (torchvision's nn.Linear default is 3x narrower here)
    fc = [m for m in heads.stages[0].head.modules() if isinstance(m, nn.Linear)][0]
    bound = (6 / (fc.in_features + fc.out_features)) ** 0.5
    assert 0.9 * bound < fc.weight.abs().max() <= bound and not fc.bias.any()


def test_giou_box_loss_hand_case():
    coder = CascadeMaskRCNN(TinyBackbone(), 3).roi_heads.stages[0].box_coder
    rois = torch.tensor([[0.0, 0.0, 2.0, 2.0], [20.0, 20.0, 30.0, 30.0]])
    gt = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0]])
    labels = torch.tensor([1, 0])  # one positive, one background RoI
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    deltas = torch.zeros(2, 4)  # decoded boxes are the RoIs themselves
    loss_cls, loss_box = cascade_box_loss(logits, deltas, rois, labels, gt, coder, box_loss_weight=10.0)
    # IoU 1/7, enclosing box 9, union 7: GIoU = 1/7 - 2/9 = -5/63, loss 68/63; summed over positives / 2 sampled
    assert loss_box.item() == pytest.approx(10 * (68 / 63) / 2)
    torch.testing.assert_close(loss_box, 10 * generalized_box_iou_loss(rois[:1], gt[:1], reduction="sum") / 2)
    torch.testing.assert_close(loss_cls, torch.nn.functional.cross_entropy(logits, labels))
    # non-zero deltas are decoded with the coder before the GIoU
    deltas = torch.tensor([[10.0, 10.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # dx = 10 / 10 widths: (+2, +2)
    _, loss_box = cascade_box_loss(logits, deltas, rois, labels, torch.tensor([[2.0, 2.0, 4.0, 4.0], [0, 0, 1, 1]]), coder)
    assert loss_box.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"iou_thresholds": (0.5, 0.6)}, ValueError, "iou_thresholds"),
        ({"num_stages": 2}, ValueError, "num_stages=2"),
        ({"score_average": "max"}, ValueError, "score_average"),
    ],
)
def test_bad_options_raise(kwargs, error, message):
    with pytest.raises(error, match=message):
        CascadeMaskRCNN(TinyBackbone(), 3, **kwargs)


def test_backbone_without_out_channels_and_bad_labels_raise():
    with pytest.raises(TypeError, match="out_channels"):
        CascadeMaskRCNN(nn.Identity(), 3)
    model = tiny_model()
    images, targets = batch()
    targets[1]["labels"] = torch.tensor([2, NUM_CLASSES])
    with pytest.raises(ValueError, match=r"labels must lie in 1\.\.2"):
        model(images, targets)


def test_background_only_image_trains():
    images, targets = batch()
    targets[1] = {
        "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 72, 64, dtype=torch.uint8)
    }
    torch.manual_seed(0)
    losses = tiny_model()(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask_s0"] > 0


# --- the release's CascadeRoIHead (mmdetection 2.11): class-specific boxes, a mask head per stage ---


class ClassPredictor(nn.Module):
    """Constant logits and class-specific deltas: class 1 moves a box right, class 2 moves it down."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.deltas = torch.tensor([10.0, 0.0, 0.0, 0.0, 0.0, 10.0, 0.0, 0.0])  # weights (10, 10, 5, 5): one width

    def forward(self, x):
        n = x.shape[0]
        return self.logits.expand(n, -1), self.deltas.expand(n, -1)


def test_predictor_regresses_per_foreground_class():
    predictor = CascadeBoxPredictor(8, 81)
    assert predictor.bbox_pred.out_features == 320
    assert CascadeBoxPredictor(8, 81, class_agnostic=True).bbox_pred.out_features == 4
    assert tiny_model().roi_heads.stages[0].predictor.bbox_pred.out_features == 4 * (NUM_CLASSES - 1)


def test_training_refines_positives_by_gt_class_and_negatives_by_best_class(monkeypatch):
    model = tiny_model(box_batch_size_per_image=1000, box_positive_fraction=1.0)
    heads = model.roi_heads
    for stage in heads.stages:
        stage.predictor = ClassPredictor([0.0, 3.0, 0.0])  # best foreground class: 1 (right)
    gt = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    targets = [{"boxes": gt, "labels": torch.tensor([2]), "masks": torch.ones(1, 64, 64, dtype=torch.uint8)}]
    proposals = [torch.tensor([[10.0, 10.0, 30.0, 28.0], [40.0, 40.0, 50.0, 50.0]])]  # IoU 0.9 (label 2), 0 (negative)
    seen = []
    sample = heads._sample
    monkeypatch.setattr(heads, "_sample", lambda stage, boxes, tg: seen.append(boxes[0].clone()) or sample(stage, boxes, tg))
    features = model.backbone(torch.rand(1, 3, 64, 64))
    heads.train()
    heads(features, proposals, [(64, 64)], targets)
    second = {tuple(b.tolist()) for b in seen[1]}
    # positive -> its gt class 2: one height down (clipped to 64); negative -> class 1: one width right (clipped)
    assert second == {(10.0, 28.0, 30.0, 46.0), (50.0, 40.0, 60.0, 50.0)}


def test_inference_refines_by_the_predicted_class_and_keeps_per_class_boxes():
    model = tiny_model(box_score_thresh=0.0).eval()
    heads = model.roi_heads
    for stage in heads.stages:
        stage.predictor = ClassPredictor([0.0, 0.0, 3.0])  # predicted class 2: down
    features = model.backbone(torch.rand(1, 3, 128, 128))
    proposal = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    with torch.no_grad():
        result, _ = heads(features, [proposal], [(128, 128)])
    # stages 0 and 1 refine with class 2 (dy = 10 / weight_y of one height), the last stage decodes every class
    box = proposal.clone()
    for weights in RELEASE_BBOX_REG_WEIGHTS[:2]:
        box = box + 10.0 / weights[1] * (box[:, 3] - box[:, 1]) * torch.tensor([0.0, 1, 0, 1])
    last = RELEASE_BBOX_REG_WEIGHTS[2]
    by_label = dict(zip(result[0]["labels"].tolist(), result[0]["boxes"]))
    height, width = box[0, 3] - box[0, 1], box[0, 2] - box[0, 0]
    torch.testing.assert_close(by_label[2], box[0] + 10.0 / last[1] * height * torch.tensor([0.0, 1, 0, 1]))
    torch.testing.assert_close(by_label[1], box[0] + 10.0 / last[0] * width * torch.tensor([1.0, 0, 1, 0]))


class ConstantMasks(nn.Module):
    def __init__(self, value_per_class):
        super().__init__()
        self.values = torch.tensor(value_per_class)

    def forward(self, x):
        return self.values[None, :, None, None].expand(x.shape[0], -1, 28, 28)


def test_masks_average_every_stage_probabilities_on_the_final_boxes():
    model = tiny_model(box_score_thresh=0.0).eval()
    heads = model.roi_heads
    for stage in heads.stages:
        stage.predictor = ClassPredictor([0.0, 0.0, 3.0])
    stage_logits = [[0.0, 4.0], [0.0, -2.0], [0.0, 0.5]]  # per stage: class 1, class 2 mask logits
    heads.mask_heads = nn.ModuleList(ConstantMasks(v) for v in stage_logits)
    features = model.backbone(torch.rand(1, 3, 128, 128))
    with torch.no_grad():
        result, _ = heads(features, [torch.tensor([[10.0, 10.0, 30.0, 30.0]])], [(128, 128)])
    logits = torch.tensor(stage_logits)
    for label, masks in zip(result[0]["labels"].tolist(), result[0]["masks"]):
        expected = logits[:, label - 1].sigmoid().mean()  # the mean of the stages' sigmoids, not sigmoid of the mean
        assert masks.shape == (1, 28, 28)
        torch.testing.assert_close(masks, expected.expand(1, 28, 28))
    assert not torch.isclose(logits[:, 1].sigmoid().mean(), logits[:, 1].mean().sigmoid())
    # class 2: (0.982 + 0.119 + 0.622) / 3 = 0.574, where the sigmoid of the mean logit (0.833) would give 0.697


def test_each_stage_trains_its_mask_head_on_its_positives_with_binary_targets():
    model = tiny_model()
    images, targets = batch()
    torch.manual_seed(0)
    losses = model(images, targets)
    sum(losses.values()).backward()
    for t, head in enumerate(model.roi_heads.mask_heads):
        assert losses[f"loss_mask_s{t}"] > 0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters()), t
