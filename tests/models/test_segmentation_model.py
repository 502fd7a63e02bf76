"""UPerNet + auxiliary FCN head on tuned dense backbones: shapes, mmseg structure, gradients, training."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation

import monatune
from monatune.models.segmentation import FCNHead, PyramidPool, SegmentationNetwork, UPerHead, build_segmenter

SWIN = ("swin_tiny_patch4_window7_224", {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8), "window_size": 4})
VIT = ("vit_tiny_patch16_224", {"embed_dim": 64, "depth": 2, "num_heads": 2})
FAMILIES = pytest.mark.parametrize("family", [SWIN, VIT], ids=["swin", "vit"])
CLASSES = 3


def segmenter(family, method="mona", **kwargs) -> SegmentationNetwork:
    name, model_kwargs = family
    options = {"bottleneck": 8} if method == "mona" else None
    return build_segmenter(name, num_classes=CLASSES, method=method, method_options=options, model_kwargs=model_kwargs,
                           channels=32, aux_channels=16, **kwargs)  # fmt: skip


def colour_batch(size=(64, 64)):
    """Images of 16-pixel blocks whose class is the block's brightest channel; a 4-pixel ignored border."""
    blocks = torch.rand(2, 3, size[0] // 16, size[1] // 16)
    images = F.interpolate(blocks, size=size, mode="nearest")
    target = images.argmax(1)
    target[:, :4], target[:, :, :4] = 255, 255
    return images, target


@FAMILIES
@pytest.mark.parametrize("size", [(64, 96), (70, 90)], ids=["64x96", "70x90"])
def test_logits_have_the_image_size(family, size):
    model = segmenter(family).train()
    images = torch.rand(2, 3, *size)
    maps = model.features(images)
    assert len(maps) == 4
    # strides 4, 8, 16, 32 (sizes rounded up: the backbone pads to its patch, patch merging pads odd maps)
    assert [m.shape[1] for m in maps] == model.decode_head.in_channels
    if size == (64, 96):
        assert [tuple(m.shape[-2:]) for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]
        assert model.decode_head(maps).shape == (2, CLASSES, 16, 24)  # the head predicts at stride 4
    out = model(images)
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == out["aux"].shape == (2, CLASSES, *size)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert set(out) == {"out"} and out["out"].shape == (2, CLASSES, *size)


def test_pyramid_only_for_vits():
    swin, vit = segmenter(SWIN), segmenter(VIT)
    assert swin.pyramid is None and swin.decode_head.in_channels == [32, 64, 128, 256]
    assert vit.pyramid is not None and vit.decode_head.in_channels == [16, 32, 64, 64]
    assert swin.aux_head.in_channels == 128 and vit.aux_head.in_channels == 64  # the third map


def test_uper_head_has_mmsegs_modules_and_widths():
    in_channels = [96, 192, 384, 768]  # Swin-T
    head = UPerHead(in_channels, 150)
    convs = [m for m in head.modules() if isinstance(m, Conv2dNormActivation)]
    assert len(convs) == 4 + 1 + 3 + 3 + 1  # PPM, bottleneck, laterals, fpn convs, fpn_bottleneck
    for conv in convs:
        c, norm, act = conv
        assert c.bias is None and isinstance(norm, nn.BatchNorm2d) and isinstance(act, nn.ReLU)

    def shape(conv):  # in, out, kernel
        return conv[0].in_channels, conv[0].out_channels, conv[0].kernel_size[0]

    assert [branch[0].output_size for branch in head.psp_modules] == [1, 2, 3, 6]
    assert [shape(branch[1]) for branch in head.psp_modules] == [(768, 512, 1)] * 4
    assert shape(head.bottleneck) == (768 + 4 * 512, 512, 3)
    assert [shape(c) for c in head.lateral_convs] == [(96, 512, 1), (192, 512, 1), (384, 512, 1)]
    assert [shape(c) for c in head.fpn_convs] == [(512, 512, 3)] * 3
    assert shape(head.fpn_bottleneck) == (4 * 512, 512, 3)
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1
    assert head.conv_seg.in_channels == 512 and head.conv_seg.out_channels == 150 and head.conv_seg.kernel_size == (1, 1)
    # mmseg's initialisation: conv_seg ~ N(0, 0.01), conv modules Kaiming normal with fan-out
    assert abs(float(head.conv_seg.weight.std()) - 0.01) < 1e-3 and not head.conv_seg.bias.any()
    expected = (2 / (512 * 9)) ** 0.5
    assert abs(float(head.fpn_bottleneck[0].weight.std()) / expected - 1) < 0.05


def test_pyramid_pooling_for_onnx_is_adaptive_pooling(monkeypatch):
    """The matrix form the TorchScript ONNX exporter gets: the same bins, for sizes the output divides or not, smaller
    or larger than the output."""
    x = torch.randn(2, 3, 13, 7, dtype=torch.float64)
    expected = {s: F.adaptive_avg_pool2d(x, s) for s in (1, 2, 3, 6, 9, (2, 5))}
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    for s, want in expected.items():
        torch.testing.assert_close(PyramidPool(s)(x), want, rtol=1e-12, atol=1e-12)


def test_fcn_head_is_the_releases_auxiliary_head():
    head = FCNHead(384, 150)
    assert len(head.convs) == 1 and head.conv_cat is None
    conv = head.convs[0][0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias) == (384, 256, (3, 3), None)
    assert head.conv_seg.in_channels == 256 and head.dropout.p == 0.1
    assert FCNHead(8, 2, channels=4, num_convs=2, concat_input=True)(torch.rand(2, 8, 5, 7)).shape == (2, 2, 5, 7)
    with pytest.raises(ValueError, match="num_convs=0"):
        FCNHead(8, 2, channels=4, num_convs=0)


def test_every_level_reaches_the_logits():
    head = UPerHead([8, 16, 32, 64], 2, channels=8)
    maps = [torch.rand(2, c, 16 // 2**i, 16 // 2**i, requires_grad=True) for i, c in enumerate([8, 16, 32, 64])]
    head(maps).sum().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in maps)


@FAMILIES
def test_mona_trains_the_heads_and_adapters_only(family):
    model = segmenter(family).train()
    images, target = colour_batch()
    out = model(images)
    (F.cross_entropy(out["out"], target, ignore_index=255) + 0.4 * F.cross_entropy(out["aux"], target, ignore_index=255)).backward()
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            assert (p.grad is not None) == p.requires_grad, name
        else:
            assert p.requires_grad and p.grad is not None, f"{name} (pyramid/head) must train"
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    adapters = tuple(f"{q}." for q, _, _ in monatune.adapter_modules(model.backbone))
    assert trainable and all(n.startswith(adapters) for n in trainable)
    assert any(p.grad.abs().sum() > 0 for n, p in model.backbone.named_parameters() if p.requires_grad)


def test_training_lowers_the_loss_and_leaves_the_frozen_backbone_alone():
    model = segmenter(SWIN).train()
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if not p.requires_grad}
    images, target = colour_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        out = model(images)
        loss = F.cross_entropy(out["out"], target, ignore_index=255) + 0.4 * F.cross_entropy(out["aux"], target, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.backbone.named_parameters() if n in frozen)


def test_eval_is_deterministic_and_training_is_not():
    model = segmenter(SWIN, dropout=0.5).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(images)["out"], model(images)["out"])
        maps = model.features(images)
        for head, x in ((model.decode_head, maps), (model.aux_head, maps[2])):
            head.train()
            assert not torch.equal(head(x), head(x)), type(head).__name__  # the heads' dropout is on in training


def test_without_aux_there_is_one_output():
    model = segmenter(SWIN, aux=False).train()
    assert model.aux_head is None and set(model(torch.rand(2, 3, 64, 64))) == {"out"}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="`num_classes` must be a positive int, got 0"):
        build_segmenter(SWIN[0], num_classes=0, model_kwargs=SWIN[1])
    with pytest.raises(ValueError, match="built for 4 maps, got 3"):
        UPerHead([4, 4, 4, 4], 2, channels=4)([torch.rand(2, 4, 4, 4)] * 3)
    with pytest.raises(ValueError, match="`dropout` must be in"):
        UPerHead([4], 2, dropout=1.0)
