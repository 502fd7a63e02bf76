"""The ``compile`` option: its checks, and the size buckets detectors pad batches to (issue 21, item 2)."""
import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from monatune.compiling import CompileOptions, compile_options, padded_side
from monatune.models.base import swap_class
from monatune.models.detection.transform import BucketedTransform
from monatune.models.oriented.views import batch_images


@pytest.mark.parametrize(
    ("side", "buckets", "expected"),
    [(500, None, 512), (512, None, 512), (500, 256, 512), (513, 256, 768), (801, [512, 800, 1344], 1344),
     (300, [512, 800, 1344], 512), (1400, [512, 800, 1344], 1408)],
)  # fmt: skip
def test_a_side_is_padded_to_32_then_to_its_bucket(side, buckets, expected):
    assert padded_side(side, 32, buckets) == expected


def test_options_are_checked():
    assert compile_options(None) is None and compile_options(False) is None
    assert compile_options(True) == CompileOptions()
    assert compile_options({"size_buckets": [800, 512]}).size_buckets == (512, 800)
    with pytest.raises(ValueError, match="unknown `compile` option"):
        compile_options({"buckets": 256})
    with pytest.raises(ValueError, match="size_buckets"):
        compile_options({"size_buckets": 0})
    with pytest.raises(ValueError, match="mode"):
        compile_options({"mode": "fast"})
    with pytest.raises(TypeError, match="`compile` must be"):
        compile_options("yes")


def test_a_bucketed_batch_is_the_usual_batch_padded_with_zeros():
    images = [torch.rand(3, 50, 70), torch.rand(3, 40, 90)]
    plain = GeneralizedRCNNTransform(64, 100, [0.5] * 3, [0.2] * 3).eval()
    bucketed = GeneralizedRCNNTransform(64, 100, [0.5] * 3, [0.2] * 3).eval()
    swap_class(bucketed, BucketedTransform)
    bucketed.size_buckets = 128
    a, _ = plain([i.clone() for i in images])
    b, _ = bucketed([i.clone() for i in images])
    assert a.image_sizes == b.image_sizes  # boxes, anchors and clipping use the images' own sizes
    assert b.tensors.shape[-2:] == (128, 128) and a.tensors.shape[-2:] != (128, 128)
    h, w = a.tensors.shape[-2:]
    torch.testing.assert_close(b.tensors[..., :h, :w], a.tensors, rtol=0, atol=0)
    assert b.tensors[..., h:, :].abs().sum() == 0 and b.tensors[..., :, w:].abs().sum() == 0


def test_oriented_batches_take_buckets_too():
    images = [torch.rand(3, 100, 60)]
    assert batch_images(images, 32).shape[-2:] == (128, 64)
    assert batch_images(images, 32, [96, 160]).shape[-2:] == (160, 96)
