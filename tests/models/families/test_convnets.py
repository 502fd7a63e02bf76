"""timm ConvNeXt (V1, V2) and ResNet / ResNeXt: slots, methods, adapter files, dense maps, parameter counts."""
import copy
import json

import pytest
import timm
import torch
from family_checks import check_dense, check_identity, check_round_trip, check_training_step
from timm.models.resnet import BasicBlock, Bottleneck

import monatune
from monatune.adapters.bottleneck import Bottleneck as BottleneckAdapter
from monatune.adapters.mona import Mona
from monatune.cli import main

TINY_CONVNEXT = dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1))
TINY_RESNET = dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128))
SMALL = dict(bottleneck=8)  # adapter width for the tiny models


def convnext(name: str = "convnext_tiny", **kwargs) -> torch.nn.Module:
    # LayerScale 0.5 instead of 1e-6, so that the branch (and what the slots do to it) shows in the output
    kwargs = {"ls_init_value": 0.5, **kwargs} if not name.startswith("convnextv2") else kwargs
    return timm.create_model(name, pretrained=False, num_classes=3, **TINY_CONVNEXT, **kwargs)


def resnet(name: str = "resnet18", **kwargs) -> torch.nn.Module:
    # zero_init_last=False: timm starts each block's last BatchNorm at weight 0, which hides the branch
    return timm.create_model(name, pretrained=False, num_classes=3, zero_init_last=False, **{**TINY_RESNET, **kwargs})


def images(size: int = 48) -> torch.Tensor:
    return torch.randn(2, 3, size, size)


# ---------------------------------------------------------------- where the slots are


def test_convnext_slots_are_where_the_docstring_says():
    block = convnext().stages[1].blocks[0]
    x = torch.randn(2, 32, 6, 5)
    plain = copy.deepcopy(block).eval()
    monatune.apply(block.eval(), "mona", head=None, **SMALL)
    mona = block.after_block.default
    with torch.no_grad():
        torch.nn.init.normal_(mona.project2.weight, std=0.1)
        expected = mona(plain(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(block(x), expected)

    for method, check in (
        ("adapter", lambda a, x, out: x + a(out.sub(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)),  # on the branch
        ("adaptformer", lambda a, x, out: out + a(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)),  # beside it
    ):
        block = copy.deepcopy(plain)
        monatune.apply(block, method, head=None, dropout=0.0, **SMALL)
        adapter = block.mlp_out.default if method == "adapter" else block.mlp_parallel.default
        assert isinstance(adapter, BottleneckAdapter)
        with torch.no_grad():
            torch.testing.assert_close(block.eval()(x), check(adapter, x, plain(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_type", [BasicBlock, Bottleneck])
def test_resnet_mona_sits_between_the_residual_add_and_the_final_relu(block_type):
    model = resnet("resnet18" if block_type is BasicBlock else "resnet50")
    block = model.layer2[0]  # with a downsample on the shortcut
    assert type(block) is block_type and block.downsample is not None
    plain = copy.deepcopy(block).eval()
    final = "act3" if block_type is Bottleneck else "act2"
    setattr(plain, final, torch.nn.Identity())  # the plain block up to its residual add
    x = torch.randn(2, block.conv1.in_channels, 7, 9)
    monatune.apply(block.eval(), "mona", head=None, **SMALL)
    mona = block.after_block.default
    with torch.no_grad():
        torch.nn.init.normal_(mona.project2.weight, std=0.1)
        expected = torch.relu(mona(plain(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        torch.testing.assert_close(block(x), expected)


def test_resnet_final_relu_runs_out_of_place_only_while_tuned():
    model = resnet()
    monatune.apply(model, "mona", **SMALL)
    assert not any(b.act2.inplace for b in model.modules() if isinstance(b, BasicBlock))
    model.train()
    model(images(32)).sum().backward()  # an in-place ReLU would overwrite the output Mona keeps for backward
    monatune.unapply(model)
    blocks = [b for b in model.modules() if isinstance(b, BasicBlock)]
    assert all(type(b) is BasicBlock and b.act2.inplace and "_monatune_inplace_act" not in b.__dict__ for b in blocks)


# ---------------------------------------------------------------- identity adapters give the original outputs


@pytest.mark.parametrize(
    "make, method, options",
    [
        (convnext, "mona", SMALL),
        (convnext, "lora", dict(modules=["fc1", "fc2"], rank=4)),
        (convnext, "adapter", SMALL),
        (convnext, "adaptformer", SMALL),
        (convnext, "ssf", {}),
        (lambda: convnext(conv_mlp=True), "mona", SMALL),  # 1x1 convolutions in the MLP, NCHW LayerNorm
        (lambda: convnext("convnextv2_tiny"), "mona", SMALL),  # GRN in the MLP, no LayerScale
        (lambda: convnext("convnextv2_tiny"), "lora", dict(modules=["fc1", "fc2"], rank=4)),
        (resnet, "mona", SMALL),
        (resnet, "ssf", {}),
        (lambda: resnet("resnet50", channels=(8, 16, 32, 64)), "mona", SMALL),
        (lambda: resnet("resnext50_32x4d"), "mona", SMALL),
        (lambda: resnet("wide_resnet50_2", channels=(8, 16, 32, 64)), "mona", SMALL),
        (lambda: resnet("seresnet50", channels=(8, 16, 32, 64)), "mona", SMALL),
        (lambda: resnet("resnet50d", channels=(8, 16, 32, 64)), "mona", SMALL),
        (lambda: resnet("ecaresnet50d", channels=(8, 16, 32, 64)), "mona", SMALL),
        (lambda: resnet("resnetblur18"), "mona", SMALL),
    ],
)
def test_identity_adapters_keep_the_outputs(make, method, options):
    check_identity(make(), images(40), method, **options)


# ---------------------------------------------------------------- every method: what trains, or a clear error

CONVNEXT_METHODS = {
    "full": {},
    "fixed": {},
    "bitfit": {},
    "norm": {},
    "partial-1": {},
    "ssf": {},
    "lora": dict(modules=["fc1", "fc2"], rank=4),
    "mona": SMALL,
    "adapter": SMALL,
    "adaptformer": SMALL,
    "lorand": dict(bottleneck=8, rank=2),
}
RESNET_METHODS = ["full", "fixed", "bitfit", "norm", "partial-1", "ssf", "mona"]


@pytest.mark.parametrize("method", CONVNEXT_METHODS)
def test_convnext_training_step_changes_exactly_the_methods_parameters(method):
    check_training_step(convnext, method, images(32), head=("head.fc",), last_block="stages.3.blocks.0",
                        **CONVNEXT_METHODS[method])


@pytest.mark.parametrize("method", RESNET_METHODS)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_training_step_changes_exactly_the_methods_parameters(name, method):
    options = SMALL if method == "mona" else {}
    check_training_step(lambda: resnet(name, channels=(8, 16, 32, 64)), method, images(), head=("fc",),
                        last_block="layer4.0", **options)


@pytest.mark.parametrize(
    "make, method, options, message",
    [
        (convnext, "vpt", {}, "vpt needs tokens that can be prepended, which timm ConvNeXt blocks do not take"),
        (convnext, "lora", {}, r"timm ConvNeXt blocks have no q, v projection; choose `modules` from \['fc1', 'fc2'\]"),
        (lambda: convnext(conv_mlp=True), "lora", dict(modules=["fc1"]), r"lora adapts linear projections, which timm ConvNeXt blocks \(ConvNeXtBlock\) do not have"),
        (resnet, "lora", dict(modules=["fc1"]), r"lora adapts linear projections, which timm ResNet blocks \(BasicBlock\) do not have"),
        (resnet, "adapter", {}, "adapter goes in the attn_out, mlp_out slot.*which timm ResNet blocks do not have"),
        (resnet, "adaptformer", {}, "adaptformer goes in the mlp_parallel slot.*which timm ResNet blocks do not have"),
        (resnet, "lorand", {}, "lorand goes in the attn_out, mlp_out slot.*which timm ResNet blocks do not have"),
        (resnet, "vpt", {}, "vpt needs tokens that can be prepended, which timm ResNet blocks do not take"),
    ],
)
def test_methods_that_do_not_apply_say_so(make, method, options, message):
    model = make()
    with pytest.raises(ValueError, match=message):
        monatune.apply(model, method, **options)
    assert not any(True for _ in monatune.adapter_modules(model)) and monatune.get_state(model) is None


def test_trained_batchnorm_updates_its_statistics_frozen_one_does_not():
    for method, updates in (("bitfit", True), ("norm", True), ("full", True), ("mona", False)):
        model = monatune.apply(resnet(), method, **(SMALL if method == "mona" else {}))
        bn = model.layer1[0].bn1
        before = bn.running_mean.clone()
        model.train()
        model(images(32))
        assert bn.training == updates  # a frozen BatchNorm is put back in eval mode at every forward
        assert (not torch.equal(bn.running_mean, before)) == updates, method


# ---------------------------------------------------------------- adapter files


@pytest.mark.parametrize(
    "make, method, options",
    [(convnext, "mona", SMALL), (convnext, "lora", dict(modules=["fc1", "fc2"], rank=4)), (resnet, "mona", SMALL)],
)
def test_adapter_round_trip(make, method, options, tmp_path):
    check_round_trip(make(), method, images(32), tmp_path / "adapter", **options)


# ---------------------------------------------------------------- dense backbones

ODD_SIZES = [(33, 47), (64, 64), (70, 21)]


@pytest.mark.parametrize("method", [None, "mona"])
def test_dense_convnext_stage_maps_for_odd_sizes(method):
    backbone = monatune.build_dense_backbone("convnext_tiny", method, model_kwargs=TINY_CONVNEXT,
                                             **(SMALL if method else {}))
    assert backbone.hierarchical and monatune.models.dense.is_hierarchical("convnextv2_atto")
    assert [n for n, _ in backbone.named_children() if n.startswith("norm")] == ["norm_pre", "norm0", "norm1", "norm2",
                                                                                  "norm3"]
    assert not any(True for _ in backbone.head.parameters()) and isinstance(backbone.norm_pre, torch.nn.Identity)
    check_dense(backbone, ODD_SIZES, channels=[16, 32, 64, 128], strides=[4, 8, 16, 32])


def test_dense_convnext_out_indices_choose_stages_and_norms():
    backbone = monatune.build_dense_backbone("convnextv2_atto", out_indices=[1, -1], model_kwargs=TINY_CONVNEXT)
    assert backbone.out_indices == [1, 3] and not hasattr(backbone, "norm0") and hasattr(backbone, "norm3")
    maps = backbone.eval()(torch.randn(1, 3, 45, 50))
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"1": (1, 32, 6, 7), "3": (1, 128, 2, 2)}


@pytest.mark.parametrize("name", ["resnet18", "resnet50d"])  # plain stem; deep stem with average-pool shortcuts
def test_dense_resnet_layer_maps_for_odd_sizes(name):
    backbone = monatune.build_dense_backbone(name, "mona", model_kwargs=TINY_RESNET, **SMALL)
    assert backbone.hierarchical and not any(n.startswith("norm") for n, _ in backbone.named_children())
    expansion = 4 if name == "resnet50d" else 1
    check_dense(backbone, ODD_SIZES, channels=[c * expansion for c in TINY_RESNET["channels"]], strides=[4, 8, 16, 32])


def test_dense_resnet_out_indices_and_wrong_models():
    backbone = monatune.build_dense_backbone("resnet18", out_indices=[2, 3], model_kwargs=TINY_RESNET)
    assert list(backbone.eval()(torch.randn(1, 3, 37, 37))) == ["2", "3"]
    with pytest.raises(ValueError, match=r"`out_indices` must be stage indices in \[0, 4\), got \[4\]"):
        monatune.build_dense_backbone("resnet18", out_indices=[4], model_kwargs=TINY_RESNET)
    with pytest.raises(ValueError, match="not one of the families dense backbones are built for"):
        monatune.build_dense_backbone("resnetv2_50")


def test_dense_maps_are_timms_stage_outputs():
    """With a classification model's weights (an input of whole strides: nothing padded), the maps are timm's
    intermediates, through the output LayerNorms for ConvNeXt."""
    x = torch.randn(1, 3, 64, 96)
    cases = (("convnext_tiny", TINY_CONVNEXT, (0, 1, 2, 3)), ("resnet50", TINY_RESNET, (1, 2, 3, 4)))  # (1..4: no stem)
    for name, kwargs, indices in cases:
        timm_model = timm.create_model(name, pretrained=False, **kwargs).eval()
        backbone = monatune.build_dense_backbone(name, model_kwargs=kwargs).eval()
        missing, unexpected = backbone.load_state_dict(timm_model.state_dict(), strict=False)
        assert all(k.startswith("norm") for k in missing) and all(k.startswith(("head.", "fc.")) for k in unexpected)
        with torch.no_grad():
            expected = timm_model.forward_intermediates(x, indices=indices, intermediates_only=True)
            maps = list(backbone(x).values())
        assert len(maps) == len(expected) == 4
        for e, got in zip(expected, maps):
            if name.startswith("convnext"):
                e = torch.nn.functional.layer_norm(e.permute(0, 2, 3, 1), e.shape[1:2], eps=1e-5).permute(0, 3, 1, 2)
            torch.testing.assert_close(got, e, atol=1e-5, rtol=1e-5)


def write_timm_checkpoint(model: torch.nn.Module, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_timm_convnext_checkpoint_loads_into_the_dense_backbone(tmp_path):
    timm_model = timm.create_model("convnext_tiny", pretrained=False, **TINY_CONVNEXT)
    write_timm_checkpoint(timm_model, tmp_path / "c.safetensors")
    backbone = monatune.build_dense_backbone("convnext_tiny", "mona", model_kwargs=TINY_CONVNEXT, **SMALL)
    report = monatune.load_pretrained(backbone, tmp_path / "c.safetensors")
    assert sorted(report.skipped) == ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]
    assert all(".after_block." in k or k.startswith("norm") for k in report.missing)


def test_timm_resnet_checkpoint_loads_into_the_dense_backbone(tmp_path):
    timm_model = timm.create_model("resnet18", pretrained=False, **TINY_RESNET)
    write_timm_checkpoint(timm_model, tmp_path / "r.safetensors")
    backbone = monatune.build_dense_backbone("resnet18", "mona", model_kwargs=TINY_RESNET, **SMALL)
    report = monatune.load_pretrained(backbone, tmp_path / "r.safetensors")
    assert sorted(report.skipped) == ["fc.bias", "fc.weight"]


# ---------------------------------------------------------------- parameter counts of the real models


def mona_size(dim: int) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Mona(dim).parameters())


@pytest.mark.parametrize(
    "name, stages",  # (blocks, width) per stage
    [
        ("convnext_tiny", [(3, 96), (3, 192), (9, 384), (3, 768)]),
        ("resnet50", [(3, 256), (4, 512), (6, 1024), (3, 2048)]),
    ],
)
def test_params_command_counts_one_mona_per_block(name, stages, capsys):
    assert main(["params", name, "--method", "mona", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = sum(n * mona_size(width) for n, width in stages)
    assert report["trainable_backbone"] == report["adapter"] == expected
    assert report["by_kind"]["adapter:mona"] == {"total": expected, "trainable": expected}
    assert report["by_kind"]["backbone"]["trainable"] == 0
