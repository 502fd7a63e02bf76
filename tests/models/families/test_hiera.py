"""timm Hiera and timm's SAM 2 Hiera (HieraDet): Mona on the true grid, every method, dense maps at any size."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from family_checks import check_dense, check_identity, check_round_trip, check_training_step
from timm.models.hiera import Unroll

import monatune
import monatune.cli
from monatune.adapters.mona import Mona
from monatune.models.dense import build_dense_backbone
from monatune.models.hiera import DenseHiera, DenseHieraDet, TunedHieraBlock, TunedHieraDetBlock

# stage 1 has a second block (no pooling); stages 0-1 use mask-unit attention, 2-3 global
TINY = dict(embed_dim=16, num_heads=1, stages=(1, 2, 1, 1), img_size=64)
# HieraDet: 4x4 windows (2x2 in the last stage), global attention in block 2 (not a pooling block)
TINY_DET = dict(embed_dim=16, num_heads=1, stages=(1, 2, 1, 1), global_att_blocks=(2,), window_spec=(4, 4, 4, 2))
METHODS = ["full", "fixed", "bitfit", "norm", "partial-1", "ssf", "lora", "mona", "adapter", "adaptformer", "lorand"]


def tiny_hiera(**kwargs) -> torch.nn.Module:
    model = timm.create_model("hiera_tiny_224", pretrained=False, num_classes=3, **{**TINY, **kwargs})
    torch.nn.init.normal_(model.head.fc.weight, std=0.1)  # timm starts it at zero: no gradient would reach the blocks
    return model


def tiny_hieradet() -> torch.nn.Module:
    model = timm.create_model("sam2_hiera_tiny", pretrained=False, num_classes=3, **TINY_DET)
    torch.nn.init.normal_(model.head.fc.weight, std=0.1)
    return model


def unroll_for(model: torch.nn.Module, block: int, grid_map: torch.Tensor) -> torch.Tensor:
    """A (B, H, W, C) map as block ``block``'s output tokens, with timm's own Unroll (the schedule left there)."""
    schedule, size = model.reroll.schedule[block]
    tokens = grid_map.flatten(1, 2)
    return Unroll(size, (1, 1), schedule)(tokens) if schedule else tokens


@pytest.mark.parametrize("block", [0, 1, 2, 3, 4])
def test_mona_convolution_sees_spatial_neighbours(block):
    """One non-zero token at (row, col): Mona's 3x3 response lands on its 3x3 neighbours on the grid."""
    model = monatune.apply(tiny_hiera(), "mona", bottleneck=4, kernel_sizes=[3], dropout=0.0).eval()
    host = model.blocks[block]
    assert isinstance(host, TunedHieraBlock)
    mona = host.after_attn.default
    with torch.no_grad():  # every stage positive, so the support is exactly where the kernel reaches
        mona.gamma.zero_()
        mona.project1.weight.fill_(1.0), mona.project1.bias.zero_()
        mona.adapter_conv.conv1.weight.fill_(1.0), mona.adapter_conv.conv1.bias.zero_()
        mona.adapter_conv.projector.weight.zero_(), mona.adapter_conv.projector.bias.zero_()
        mona.project2.weight.fill_(1.0), mona.project2.bias.zero_()
    h, w = model.reroll.schedule[block][1]
    r, c = h // 2 - 1, w // 2
    grid = torch.zeros(1, h, w, host.dim_out)
    grid[0, r, c, 0] = 1.0
    tokens = unroll_for(model, block, grid)
    with torch.no_grad():
        out = model.reroll(host._adapt_on_grid("after_attn", tokens), block)  # timm's Reroll: back to the grid
    changed = (out - grid).abs().sum(-1)[0] > 0
    expected = torch.zeros(h, w, dtype=torch.bool)
    expected[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = True
    assert torch.equal(changed, expected)


def test_tuned_model_is_reroll_mona_unroll():
    """The tuned model equals Hiera's forward with Mona applied by timm's Reroll -> Mona on the map -> timm's Unroll."""
    model = monatune.apply(tiny_hiera(), "mona", bottleneck=8).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default." in name:
                p.add_(torch.randn_like(p) * 0.1)  # non-trivial adapters
    x = torch.randn(2, 3, 64, 64)

    def on_grid(mona: Mona, tokens: torch.Tensor, i: int) -> torch.Tensor:
        return unroll_for(model, i, mona(model.reroll(tokens, i)))

    with torch.no_grad():
        expected = model.unroll(model._pos_embed(model.patch_embed(x)))
        for i, blk in enumerate(model.blocks):  # timm's HieraBlock.forward, written out, Mona after each residual add
            x_norm = blk.norm1(expected)
            if blk.do_expand:
                expected = blk.proj(x_norm).view(2, blk.attn.q_stride, -1, blk.dim_out).amax(dim=1)
            expected = on_grid(blk.after_attn.default, expected + blk.attn(x_norm), i)
            expected = on_grid(blk.after_mlp.default, expected + blk.mlp(blk.norm2(expected)), i)
        got = model.forward_features(x)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("make, tuned", [(tiny_hiera, TunedHieraBlock), (tiny_hieradet, TunedHieraDetBlock)])
@pytest.mark.parametrize("method", ["mona", "lora"])
def test_identity_adapters_give_the_original(make, tuned, method):
    model = check_identity(make(), torch.randn(2, 3, 64, 64), method)
    assert all(isinstance(b, tuned) == (method == "mona") for b in model.blocks)


@pytest.mark.parametrize("make", [tiny_hiera, tiny_hieradet])
@pytest.mark.parametrize("method", METHODS)
def test_training_step_changes_exactly_the_method_params(make, method):
    check_training_step(make, method, torch.randn(2, 3, 64, 64), head=["head"], last_block="blocks.4")


@pytest.mark.parametrize("make, family", [(tiny_hiera, "timm Hiera"), (tiny_hieradet, "timm SAM 2 Hiera")])
def test_vpt_is_refused(make, family):
    with pytest.raises(ValueError, match=f"vpt needs tokens.*{family}"):
        monatune.apply(make(), "vpt")


def test_adapter_round_trip_and_unapply(tmp_path):
    base = tiny_hiera()
    check_round_trip(base, "mona", torch.randn(1, 3, 64, 64), tmp_path)
    tuned = monatune.apply(base, "mona")
    assert base.patch_embed._forward_pre_hooks and base.blocks[2].hiera_index == 2
    monatune.unapply(tuned)
    assert not base.patch_embed._forward_pre_hooks and "hiera_layout" not in base.__dict__
    assert all(type(b).__name__ == "HieraBlock" and "hiera_index" not in b.__dict__ for b in base.blocks)


def test_masked_input_is_refused_at_mona():
    model = monatune.apply(tiny_hiera(), "mona").eval()
    mask = torch.tensor([[True, False, True, False]])  # 2x2 mask units of 32 px
    with pytest.raises(ValueError, match="masked inputs"):
        model.forward_features(torch.randn(1, 3, 64, 64), mask=mask)


@pytest.mark.parametrize("name, kwargs, cls", [
    ("hiera_tiny_224", TINY, DenseHiera), ("hiera_small_abswin_256", TINY, DenseHiera),
    ("sam2_hiera_tiny", TINY_DET, DenseHieraDet),
])
def test_dense_maps_at_strides_for_any_size(name, kwargs, cls):
    backbone = build_dense_backbone(name, "mona", model_kwargs=kwargs)
    assert isinstance(backbone, cls) and backbone.hierarchical
    check_dense(backbone, [(64, 64), (37, 71), (97, 33)], channels=[16, 32, 64, 128], strides=[4, 8, 16, 32])


@pytest.mark.parametrize("name, kwargs", [("hiera_tiny_224", TINY), ("sam2_hiera_tiny", TINY_DET)])
def test_dense_at_native_size_is_timm_intermediates(name, kwargs):
    """At a size needing no padding the dense maps are timm's stage-end intermediates through the output norms;
    with identity Mona adapters at an odd size, those of the untuned dense backbone."""
    backbone = build_dense_backbone(name, model_kwargs=kwargs, out_indices=[1, 3])
    reference = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    reference.load_state_dict(backbone.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = backbone.eval()(x)
        feats = reference.eval().forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert list(got) == ["1", "3"]
    for (i, g), f in zip(got.items(), feats):
        norm = getattr(backbone, f"norm{i}")
        torch.testing.assert_close(g, norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    check_identity(backbone, torch.randn(1, 3, 45, 70), "mona")


@pytest.mark.parametrize("name", ["hiera_tiny_224", "sam2_hiera_tiny"])
def test_cli_params_counts_the_mona_adapters(name, capsys):
    assert monatune.cli.main(["params", name, "--method", "mona", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    mona = sum(2 * sum(p.numel() for p in Mona(b.dim_out).parameters()) for b in model.blocks)
    assert report["trainable_backbone"] == report["adapter"] == mona
    backbone = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.head.parameters())
    norms = sum(2 * c for c in (96, 192, 384, 768))
    assert report["backbone"] == backbone + norms
