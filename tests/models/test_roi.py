"""mmdetection 2.x RoI operations: level mapping, aligned RoIAlign, binarised mask targets, mask pasting."""
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import MultiScaleRoIAlign

from monatune.models.detection.roi import LevelRoIAlign, mask_targets, paste_masks


def test_levels_follow_mmdet_finest_scale_56():
    pool = LevelRoIAlign(["0", "1", "2", "3"], 7)
    sides = torch.tensor([10.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    assert pool.levels(boxes).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_roi_align_is_aligned_with_adaptive_sampling():
    # a ramp f(x, y) = x on a stride-1 map: aligned bins average x - 0.5 over their samples
    ramp = torch.arange(16.0).expand(1, 1, 16, 16).contiguous()
    pool = LevelRoIAlign(["0"], 2, (1,))
    box = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    out = pool({"0": ramp}, [box])
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([1.5, 5.5]))
    # torchvision's MultiScaleRoIAlign is not aligned: it gives the bin centres 2 and 6
    tv = MultiScaleRoIAlign(["0"], 2, 0)(({"0": ramp}), [box], [(16, 16)])
    torch.testing.assert_close(tv[0, 0, 0], torch.tensor([2.0, 6.0]))


def test_roi_align_keeps_box_order_across_levels_and_images():
    maps = {"0": torch.full((2, 1, 64, 64), 1.0), "1": torch.full((2, 1, 32, 32), 2.0)}
    maps["0"][1] = 3.0
    maps["1"][1] = 4.0
    pool = LevelRoIAlign(["0", "1"], 2, (4, 8))
    small, large = torch.tensor([[0.0, 0, 20, 20]]), torch.tensor([[0.0, 0, 200, 200]])
    out = pool(maps, [torch.cat([large, small]), small])
    assert out[:, 0, 0, 0].tolist() == [2.0, 1.0, 3.0]
    assert pool(maps, [torch.zeros(0, 4)]).shape == (0, 1, 2, 2)


def test_mask_targets_are_binarised_aligned_crops():
    gt = torch.zeros(1, 10, 10)
    gt[0, :, :5] = 1  # left half
    targets = mask_targets(gt, torch.tensor([[0.0, 0.0, 10.0, 10.0], [3.0, 0.0, 7.0, 4.0]]), torch.tensor([0, 0]), size=4)
    assert set(targets.unique().tolist()) <= {0.0, 1.0}
    assert targets[0, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    # the second box straddles the edge: bin centres at x = 3.5, 4.5, 5.5, 6.5 -> columns 3, 4 inside (soft at 4.5: 0.5)
    assert targets[1, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    # boxes beyond the mask are clipped to it first
    clipped = mask_targets(gt, torch.tensor([[-10.0, 0.0, 10.0, 10.0]]), torch.tensor([0]), size=4)
    torch.testing.assert_close(clipped, targets[:1])


def test_paste_fills_exactly_the_pixels_whose_centres_lie_in_the_box():
    ones = torch.ones(1, 1, 28, 28)
    pasted = paste_masks(ones, torch.tensor([[2.0, 3.0, 6.0, 5.0]]), (8, 8))
    expected = torch.zeros(8, 8)
    expected[3:5, 2:6] = 1
    torch.testing.assert_close(pasted[0, 0], expected)
    # torchvision pads the map and rounds the box, so its paste spills over the box
    tv = paste_masks_in_image(ones, torch.tensor([[2.0, 3.0, 6.0, 5.0]]), (8, 8))
    assert not torch.equal(tv[0, 0] >= 0.5, expected.bool())


def test_paste_samples_the_map_bilinearly():
    ramp = torch.tensor([[0.0, 1.0]]).expand(1, 1, 2, 2).contiguous()  # left column 0, right column 1
    pasted = paste_masks(ramp, torch.tensor([[0.0, 0.0, 4.0, 2.0]]), (2, 4))
    # pixel centres x = 0.5 .. 3.5 sample map columns -0.25, 0.25, 0.75, 1.25; outside the map is zero (grid_sample's padding)
    torch.testing.assert_close(pasted[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 0.75]))
    assert paste_masks(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (5, 6)).shape == (0, 1, 5, 6)
