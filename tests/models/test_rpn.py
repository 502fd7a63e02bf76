"""BorderRPN: mmdetection's allowed_border=0 and min_bbox_size=0 on torchvision's RPN."""
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from monatune.models.detection.rpn import BorderRPN, inside_anchors


def rpn(cls=BorderRPN, **kw):
    generator = AnchorGenerator(((16,),), ((1.0,),))
    return cls(generator, RPNHead(4, 1), 0.7, 0.3, 256, 0.5, dict(training=100, testing=100), dict(training=100, testing=100), 0.7, **kw)


def test_inside_flags_follow_mmdet():
    anchors = torch.tensor([[0.0, 0, 10, 10], [-1.0, 0, 10, 10], [0.0, 0, 20, 10], [0.0, 0, 19.9, 9.9]])
    assert inside_anchors(anchors, (10, 20)).tolist() == [False, False, False, True]  # x2 < w, y2 < h
    assert inside_anchors(anchors, (10, 20), allowed_border=1).tolist() == [True, True, True, True]
    assert inside_anchors(anchors, (10, 20), allowed_border=-1).all()


def test_anchors_crossing_the_border_are_neither_positive_nor_negative():
    model = rpn()
    model._image_sizes = [(32, 32)]
    anchors = [torch.tensor([[0.0, 0, 16, 16], [-8.0, -8, 8, 8], [20.0, 20, 36, 36], [16.0, 16, 31, 31]])]
    gt = {"boxes": torch.tensor([[0.0, 0, 16, 16]])}
    labels, matched = model.assign_targets_to_anchors(anchors, [gt])
    assert labels[0].tolist() == [1.0, -1.0, -1.0, 0.0]
    # torchvision's RPN labels the border-crossing anchor as a negative and the outside one too
    tv = rpn(RegionProposalNetwork)
    tv_labels, _ = tv.assign_targets_to_anchors(anchors, [gt])
    assert tv_labels[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    empty, _ = model.assign_targets_to_anchors(anchors, [{"boxes": torch.zeros(0, 4)}])
    assert empty[0].tolist() == [0.0, -1.0, -1.0, 0.0]


def test_the_assigner_sees_only_inside_anchors():
    """A gt's best anchor is its best *inside* anchor (low-quality matches are taken among those)."""
    model = rpn()
    model.proposal_matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True)
    model._image_sizes = [(64, 64)]
    gt = {"boxes": torch.tensor([[0.0, 0, 20, 20]])}
    # the crossing anchor overlaps the gt most (IoU 0.37), the inside one less (0.25): the inside one is the best match
    anchors = [torch.tensor([[-2.0, -2, 13, 13], [0.0, 0, 10, 10], [40.0, 40, 60, 60]])]
    labels, matched = model.assign_targets_to_anchors(anchors, [gt])
    assert labels[0].tolist() == [-1.0, 1.0, 0.0]
    torch.testing.assert_close(matched[0][1], gt["boxes"][0])


def test_proposals_are_not_filtered_by_size():
    model = rpn().eval()
    assert model.min_size == 0.0 and rpn(RegionProposalNetwork).min_size == 1e-3
    proposals = torch.tensor([[[1.0, 1, 1.0005, 5], [2.0, 2, 9, 9]]])
    objectness = torch.tensor([[2.0, 1.0]])
    boxes, _ = model.filter_proposals(proposals, objectness, [(16, 16)], [2])
    assert len(boxes[0]) == 2
