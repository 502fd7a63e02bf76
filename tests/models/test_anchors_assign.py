"""mmdetection 2.x anchors (unrounded, configured strides) and MaxIoUAssigner (low-quality matches)."""
import math

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from monatune.models.detection.anchors import MMDetAnchorGenerator
from monatune.models.detection.assign import MaxIoUAssigner


def test_base_anchors_are_mmdets_formula_unrounded():
    gen = MMDetAnchorGenerator((4, 8), (0.5, 1.0, 2.0), scales=(8,))
    base = gen.cell_anchors[0]
    w = 32 / math.sqrt(0.5) / 2  # ratio h / w = 0.5: w = 32 * sqrt(2), h = 32 / sqrt(2)
    h = 32 * math.sqrt(0.5) / 2
    torch.testing.assert_close(base[0], torch.tensor([-w, -h, w, h]))
    torch.testing.assert_close(base[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    assert not torch.equal(base, base.round())  # torchvision's generator rounds these
    assert torch.equal(AnchorGenerator(((32,),), ((0.5, 1.0, 2.0),)).cell_anchors[0], base.round())


def test_retinanet_octave_scales():
    gen = MMDetAnchorGenerator((8,), (1.0,), octave_base_scale=4, scales_per_octave=3)
    sides = (gen.cell_anchors[0][:, 2] * 2).tolist()
    assert sides == pytest.approx([32.0, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)])  # 32, 40.3, 50.8 (torchvision: 32, 40, 50)
    with pytest.raises(ValueError, match="scales"):
        MMDetAnchorGenerator((8,), (1.0,))


def test_anchors_use_the_configured_strides():
    gen = MMDetAnchorGenerator((32, 64), (1.0,), scales=(1,))
    images = ImageList(torch.zeros(1, 3, 800, 800), [(800, 800)])
    feats = [torch.zeros(1, 1, 25, 25), torch.zeros(1, 1, 13, 13)]  # 800 / 64 = 12.5 -> 13 cells
    anchors = gen(images, feats)[0]
    top = anchors[25 * 25:]
    centres = (top[:, 0] + top[:, 2]) / 2
    assert centres[:13].tolist() == [64.0 * k for k in range(13)]  # torchvision infers 800 // 13 = 61
    tv = AnchorGenerator(((32,), (64,)), ((1.0,),) * 2)(images, feats)[0][25 * 25:]
    assert ((tv[1, 0] + tv[1, 2]) / 2).item() == 61.0


def test_low_quality_match_goes_to_the_gt_it_is_best_for_and_needs_min_pos_iou():
    iou = torch.tensor([
        [0.45, 0.10, 0.20, 0.0],  # gt 0: best anchor 0 (0.45)
        [0.50, 0.35, 0.05, 0.0],  # gt 1: best anchor 0 too (0.50), anchor 1 0.35
        [0.00, 0.00, 0.25, 0.0],  # gt 2: best 0.25, under min_pos_iou 0.3
    ])
    ours = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3)(iou)
    # anchor 0: below 0.7, best for gt 0 and gt 1 -> the later gt (1) wins; anchor 1: between -> ignored;
    # anchor 2: 0.25 < 0.3 -> negative (gt 2's best is too weak); anchor 3: negative
    assert ours.tolist() == [1, -2, -1, -1]
    theirs = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    assert theirs.tolist() == [1, -2, 2, -1]  # torchvision takes gt 2's 0.25 match
    retina = MaxIoUAssigner(0.5, 0.4, min_pos_iou=0.0)(iou)
    assert retina.tolist() == [1, -1, 2, -1]


def test_ties_and_positives():
    iou = torch.tensor([[0.8, 0.6, 0.6, 0.1]])
    assert MaxIoUAssigner(0.5, 0.4)(iou).tolist() == [0, 0, 0, -1]
    iou = torch.tensor([[0.3, 0.3, 0.1]])
    assert MaxIoUAssigner(0.5, 0.4)(iou).tolist() == [0, 0, -1]  # every tied best anchor
    assert MaxIoUAssigner(0.5, 0.4, gt_max_assign_all=False)(iou).tolist() == [0, -1, -1]
    assert MaxIoUAssigner(0.5, 0.4, match_low_quality=False)(iou).tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="no ground truth"):
        MaxIoUAssigner(0.5, 0.4)(torch.zeros(0, 3))
