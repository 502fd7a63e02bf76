"""Injection: placements in each family, freezing, head, several adapters, unapply, errors."""
import copy

import pytest
import timm
import torch
from tiny_models import tiny_swin, tiny_vit
from torch import nn

import monatune
from monatune.adapters.mona import Mona
from monatune.models.swin import TunedSwinBlock


def _randomize_adapters(model):
    with torch.no_grad():
        for _, _, adapter in monatune.adapter_modules(model):
            for p in adapter.parameters():
                p.add_(torch.randn_like(p) * 0.1)


def test_swin_two_monas_per_block_after_each_residual():
    model = monatune.apply(tiny_swin().eval(), "mona")
    blocks = [m for m in model.modules() if isinstance(m, TunedSwinBlock)]
    assert len(blocks) == 8
    for block in blocks:
        assert isinstance(block.after_attn["default"], Mona) and isinstance(block.after_mlp["default"], Mona)
        assert block.after_attn["default"].dim == block.norm1.normalized_shape[0]
    _randomize_adapters(model)
    # The block computes exactly the spec's equations, in this order.
    block = blocks[3]
    x = torch.randn(2, *block.input_resolution, block.norm1.normalized_shape[0])
    x1 = block.after_attn["default"](x + block._attn(block.norm1(x)))
    expected = block.after_mlp["default"](x1 + block.mlp(block.norm2(x1)))
    assert torch.allclose(block(x), expected, atol=1e-6)


def test_vit_placement_with_class_and_register_tokens_and_dynamic_sizes():
    model = tiny_vit(reg_tokens=4, dynamic_img_size=True).eval()
    monatune.apply(model, "mona")
    _randomize_adapters(model)
    assert model.num_prefix_tokens == 5
    block = model.blocks[1]
    for size, grid in [((224, 224), (14, 14)), ((96, 160), (6, 10))]:
        model(torch.randn(1, 3, *size))
        assert block.token_grid.hw == grid
    x = torch.randn(2, 5 + 60, model.embed_dim)
    mona1, mona2 = block.after_attn["default"], block.after_mlp["default"]
    x1 = mona1(x + block.ls1(block.attn(block.norm1(x))), hw=(6, 10), num_prefix_tokens=5)
    expected = mona2(x1 + block.ls2(block.mlp(block.norm2(x1))), hw=(6, 10), num_prefix_tokens=5)
    assert torch.allclose(block(x), expected, atol=1e-6)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("deit_tiny_distilled_patch16_224", dict(depth=2)),  # class + distillation token
        ("vit_small_patch14_reg4_dinov2", dict(depth=2, embed_dim=64, num_heads=2, img_size=70)),  # LayerScale + registers
        ("eva02_tiny_patch14_224", dict(depth=2)),  # EVA block with RoPE
    ],
)
def test_other_vit_families_train(name, kwargs):
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)
    size = model.pretrained_cfg["input_size"][-1] if "img_size" not in kwargs else kwargs["img_size"]
    monatune.apply(model, "mona")
    assert sum(1 for _ in monatune.adapter_modules(model)) == 4
    out = model(torch.randn(2, 3, size, size))
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()
    for _, _, adapter in monatune.adapter_modules(model):
        assert adapter.project2.weight.grad is not None and adapter.project2.weight.grad.abs().sum() > 0


def test_swin_any_size_the_backbone_accepts():
    model = monatune.apply(tiny_swin(dynamic_img_size=True), "mona")
    for size in [(224, 224), (160, 192), (96, 128)]:
        assert model(torch.randn(1, 3, *size)).shape == (1, 5)


def test_only_adapters_and_head_train_and_freezing_survives_train():
    model = tiny_swin()
    monatune.apply(model, "mona")
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter_params = {f"{q}.{n}" for q, _, a in monatune.adapter_modules(model) for n, _ in a.named_parameters()}
    assert trainable == adapter_params | {"head.fc.weight", "head.fc.bias"}
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(2, 3, 224, 224)).logsumexp(-1).sum().backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and changed <= adapter_params | {"head.fc.weight", "head.fc.bias"}
    assert any(k.startswith("head.") for k in changed) and any(".after_mlp." in k for k in changed)


def test_head_names_and_no_head():
    model = monatune.apply(tiny_vit(), "mona", head=["head", "norm"])
    assert model.norm.weight.requires_grad and model.head.weight.requires_grad
    model = monatune.apply(tiny_vit(), "mona", head=None)
    assert not model.head.weight.requires_grad


def test_pattern_placement_on_convnext_stages_and_swin_stages():
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    monatune.apply(convnext, "mona", targets=r"stages\.\d+")
    dims = [a.dim for _, _, a in monatune.adapter_modules(convnext)]
    assert dims == [40, 80, 160, 320]
    out = convnext(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert convnext.monatune_points.stages__3.default.project2.weight.grad is not None
    # A stage's output passes through its adapter: make that adapter an identity and the output returns.
    swin = tiny_swin().eval()
    plain = swin(torch.randn(1, 3, 224, 224))
    monatune.apply(swin, "mona", targets=r"layers\.\d+", layout="NHWC")
    x = torch.randn(1, 3, 224, 224)
    tuned = swin(x)
    with torch.no_grad():
        for _, _, a in monatune.adapter_modules(swin):
            a.project2.weight.zero_(), a.project2.bias.zero_()
    assert not torch.allclose(tuned, swin(x))
    monatune.unapply(swin)
    assert torch.allclose(swin(x), swin(x)) and plain.shape == tuned.shape


def test_wrong_layout_is_reported_at_forward():
    swin = tiny_swin()
    monatune.apply(swin, "mona", targets=r"layers\.0", layout="NCHW")
    with pytest.raises(ValueError, match="layout"):
        swin(torch.randn(1, 3, 224, 224))


def test_frozen_batchnorm_keeps_its_statistics_under_train():
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=3)
    monatune.apply(resnet, "mona", targets=r"layer\d")
    resnet.train()
    stats = resnet.bn1.running_mean.clone()
    resnet(torch.randn(4, 3, 64, 64))
    assert torch.equal(resnet.bn1.running_mean, stats)
    monatune.unapply(resnet)
    resnet.train()
    resnet(torch.randn(4, 3, 64, 64))
    assert not torch.equal(resnet.bn1.running_mean, stats)  # the control: an unfrozen BN does update


@pytest.mark.parametrize("factory", [tiny_swin, tiny_vit])
def test_unapply_restores_the_model_exactly(factory):
    model = factory().eval()
    x = torch.randn(1, 3, 224, 224)
    reference = model(x)
    classes = {n: type(m) for n, m in model.named_modules()}
    keys = list(model.state_dict())
    monatune.apply(model, "mona")
    _randomize_adapters(model)
    assert not torch.allclose(model(x), reference)
    monatune.unapply(model)
    assert torch.equal(model(x), reference)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert list(model.state_dict()) == keys
    assert all(p.requires_grad for p in model.parameters()) and not monatune.is_tuned(model)
    assert copy.deepcopy(model)(x).shape == reference.shape


def test_several_named_adapters_switch_and_restore():
    model = tiny_swin().eval()
    monatune.apply(model, "mona", adapter_name="a")
    monatune.apply(model, "mona", adapter_name="b", bottleneck=16)
    _randomize_adapters(model)
    x = torch.randn(1, 3, 224, 224)
    monatune.set_active_adapter(model, "a")
    out_a = model(x)
    monatune.set_active_adapter(model, "b")
    out_b = model(x)
    assert not torch.allclose(out_a, out_b)
    assert all(p.requires_grad == (".b." in n or n.startswith("head.")) for n, p in model.named_parameters())
    monatune.set_active_adapter(model, "a")
    assert torch.equal(model(x), out_a)


def test_deepcopy_of_a_tuned_vit_keeps_its_own_grid():
    model = monatune.apply(tiny_vit(dynamic_img_size=True), "mona")
    clone = copy.deepcopy(model)
    clone(torch.randn(1, 3, 96, 96))
    assert clone.blocks[0].token_grid.hw == (6, 6) and model.blocks[0].token_grid is not clone.blocks[0].token_grid


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: monatune.apply(tiny_swin(), "monna"), r"unknown tuning method 'monna'; supported: .*mona"),
        (lambda: monatune.apply(tiny_swin(), "mona", bottleneck=0), "bottleneck"),
        (lambda: monatune.apply(tiny_swin(), "mona", rank=4), r"unknown option\(s\) \['rank'\].*bottleneck"),
        (lambda: monatune.apply(tiny_swin(), "mona", targets=r"stage\d"), "matched no module.*layers"),
        (lambda: monatune.apply(tiny_swin(), "mona", targets="(["), "not a valid regular expression"),
        (lambda: monatune.apply(tiny_swin(), "mona", head="classifier"), r"head module\(s\) \['classifier'\] not found"),
        (lambda: monatune.apply(timm.create_model("mobilenetv3_small_050", pretrained=False), "mona"),
         "no block rules for MobileNetV3.*Swin.*ViT.*ConvNeXt.*ResNet.*targets"),
        (lambda: monatune.apply(tiny_swin(), "mona", layout="CHW"), "layout"),
    ],
)
def test_errors_say_what_is_supported(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_failed_apply_changes_nothing():
    model = tiny_swin()
    keys = list(model.state_dict())
    with pytest.raises(ValueError):
        monatune.apply(model, "mona", head="nope")
    with pytest.raises(ValueError):
        monatune.apply(model, "mona", kernel_sizes=(2,))
    assert list(model.state_dict()) == keys and not monatune.is_tuned(model)
    assert all(type(m).__name__ != "TunedSwinBlock" for m in model.modules())
    monatune.apply(model, "mona", adapter_name="x")
    with pytest.raises(ValueError, match="already has an adapter named 'x'"):
        monatune.apply(model, "mona", adapter_name="x")


@pytest.mark.parametrize(
    "name,kwargs,size",
    [
        ("swin_tiny_patch4_window7_224", dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)), 224),
        ("vit_tiny_patch16_224", dict(depth=2, reg_tokens=2), 224),
        ("vit_small_patch14_reg4_dinov2", dict(depth=2, embed_dim=64, num_heads=2, img_size=70), 70),
        ("eva02_tiny_patch14_224", dict(depth=2), 224),
    ],
)
def test_tuned_blocks_compute_what_timm_computes_when_adapters_are_identities(name, kwargs, size):
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    expected = model(x)
    monatune.apply(model, "mona")
    with torch.no_grad():
        for _, _, adapter in monatune.adapter_modules(model):
            adapter.project2.weight.zero_()
            adapter.project2.bias.zero_()
    assert torch.allclose(model(x), expected, atol=1e-5)
