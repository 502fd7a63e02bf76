"""MMDetTransform: mmcv's rounding of the evaluation size, mmdet's mask pasting."""
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from monatune.models.detection.transform import MMDetTransform, rescale_size

MEAN, STD = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]


def test_rescale_size_rounds_as_mmcv():
    # 427 x 640 to (1333, 800): scale 800 / 427 = 1.8735; width 1199.06 -> 1199, height 800
    assert rescale_size(427, 640, 800, 1333) == (800, 1199)
    # 500 x 333 to (1000, 600): scale 1.8018; 900.9 -> 901 (torchvision floors to 900)
    assert rescale_size(333, 500, 600, 1000) == (600, 901)


def test_eval_size_is_mmcv_rounded_where_torchvision_floors():
    image = torch.rand(3, 333, 500)
    ours = MMDetTransform(600, 1000, MEAN, STD).eval()
    theirs = GeneralizedRCNNTransform(600, 1000, MEAN, STD).eval()
    assert ours([image])[0].image_sizes == [(600, 901)]
    assert theirs([image])[0].image_sizes == [(600, 900)]


def test_postprocess_maps_boxes_back_and_pastes_masks_mmdet_style():
    t = MMDetTransform(16, 32, MEAN, STD).eval()
    masks = torch.ones(1, 1, 28, 28)
    out = t.postprocess([{"boxes": torch.tensor([[4.0, 6.0, 12.0, 10.0]]), "masks": masks}], [(16, 16)], [(8, 8)])
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[2.0, 3.0, 6.0, 5.0]]))
    expected = torch.zeros(8, 8)
    expected[3:5, 2:6] = 1
    torch.testing.assert_close(out[0]["masks"][0, 0], expected)
