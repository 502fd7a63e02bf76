"""Cascade Mask R-CNN on torchvision's parts: losses, stage weights, training, inference, scores, coders, GIoU."""
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, generalized_box_iou_loss
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from monatune.models.detection.cascade import (
    RELEASE_BBOX_REG_WEIGHTS,
    CascadeBoxPredictor,
    CascadeMaskRCNN,
    cascade_box_loss,
)

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
        box_roi_pool=MultiScaleRoIAlign(names, 7, 2), mask_roi_pool=MultiScaleRoIAlign(names, 14, 2),
        box_heads=[FastRCNNConvFCHead((32, 7, 7), [16], [64], norm_layer=nn.BatchNorm2d) for _ in range(3)],
        box_predictors=[CascadeBoxPredictor(64, NUM_CLASSES) for _ in range(3)],
        box_batch_size_per_image=64,
        mask_head=MaskRCNNHeads(32, [16], 1), mask_predictor=MaskRCNNPredictor(16, 16, NUM_CLASSES),
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
    stages = {f"loss_{k}_s{t}" for k in ("classifier", "box_reg") for t in range(3)}
    assert set(losses) == stages | {"loss_objectness", "loss_rpn_box_reg", "loss_mask"}
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), name



def test_every_stage_and_head_gets_gradients():
    model = tiny_model()
    sum(losses_of(model).values()).backward()
    heads = model.roi_heads
    parts = {f"stages.{t}.predictor.bbox_pred": s.predictor.bbox_pred for t, s in enumerate(heads.stages)}
    parts |= {f"stages.{t}.head": s.head for t, s in enumerate(heads.stages)}
    parts |= {"mask_predictor": heads.mask_predictor, "rpn.head": model.rpn.head, "backbone": model.backbone}
    for name, module in parts.items():
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name


def test_stage_loss_weights_scale_each_stage():
    weighted = losses_of(tiny_model())  # release: 1 / 0.5 / 0.25
    plain = losses_of(tiny_model(stage_loss_weights=(1.0, 1.0, 1.0)))
    for t, w in enumerate((1.0, 0.5, 0.25)):
        for kind in ("classifier", "box_reg"):
            key = f"loss_{kind}_s{t}"
            assert plain[key] > 0
            torch.testing.assert_close(weighted[key], w * plain[key])
    torch.testing.assert_close(weighted["loss_mask"], plain["loss_mask"])


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
    assert heads.box_roi_pool.output_size == (7, 7) and heads.box_roi_pool.sampling_ratio == 2
    assert heads.mask_roi_pool.output_size == (14, 14)
    for stage in heads.stages:  # "4conv1fc": four 3x3 convs of 256 with a norm, one fc of 1024, class-agnostic boxes
        convs = [m for m in stage.head.modules() if isinstance(m, nn.Conv2d)]
        assert [(c.out_channels, c.kernel_size) for c in convs] == [(256, (3, 3))] * 4
        assert sum(isinstance(m, nn.BatchNorm2d) for m in stage.head.modules()) == 4
        assert [m.out_features for m in stage.head.modules() if isinstance(m, nn.Linear)] == [1024]
        assert (stage.predictor.cls_score.out_features, stage.predictor.bbox_pred.out_features) == (81, 4)
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 81
    assert heads.score_average == "probs"


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
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0
