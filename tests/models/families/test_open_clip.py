"""open_clip image tower (models/open_clip_tower.py): the tuned block in both token layouts, the methods that apply,
other image sizes, and the text tower left alone."""
from __future__ import annotations

import copy

import pytest
import torch
from family_checks import check_identity, check_round_trip, check_training_step
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import ResidualAttentionBlock, Transformer, VisionTransformer

import monatune
from monatune.models.base import TunedBlockMixin
from monatune.methods import METHODS
from monatune.models.open_clip_tower import ConvGrid

X = torch.randn(2, 3, 32, 32)


def make_tower(ls_init_value: float | None = 0.5, batch_first: bool = True) -> VisionTransformer:
    """A tiny image tower (4 x 4 patches of 8 px, LayerScale); ``batch_first=False``: the same weights in a
    sequence-first Transformer (open_clip's towers are batch-first; its Transformer still takes both)."""
    torch.manual_seed(0)
    tower = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0,
                              ls_init_value=ls_init_value, output_dim=16)  # fmt: skip
    if not batch_first:
        seq_first = Transformer(32, 2, 2, 2.0, ls_init_value=ls_init_value, batch_first=False)
        seq_first.load_state_dict(tower.transformer.state_dict())
        tower.transformer = seq_first
    return tower


def make_clip() -> CLIP:
    return CLIP(16, CLIPVisionCfg(layers=2, width=32, head_width=16, mlp_ratio=2.0, patch_size=8, image_size=32),
                CLIPTextCfg(context_length=8, vocab_size=40, width=32, heads=2, layers=2))  # fmt: skip


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("ls_init_value", [None, 0.5])
def test_identity_adapters_change_nothing(ls_init_value, batch_first):
    check_identity(make_tower(ls_init_value, batch_first), X, "mona", bottleneck=8)
    check_identity(make_tower(ls_init_value, batch_first), X, "lora", modules=["fc1", "fc2"], rank=2)


@pytest.mark.parametrize("method", ["mona", "adapter", "adaptformer", "lorand", "vpt"])
def test_both_layouts_compute_the_same(method):
    """The same adapter weights give the same outputs whether the blocks see (B, N, C) or (N, B, C)."""
    batch_first = monatune.apply(make_tower(), method, bottleneck=8) if method != "vpt" else \
        monatune.apply(make_tower(), method, num_tokens=3)  # fmt: skip
    seq_first = monatune.apply(make_tower(batch_first=False), method, **({"num_tokens": 3} if method == "vpt" else
                                                                         {"bottleneck": 8}))  # fmt: skip
    assert seq_first.transformer.resblocks[0].attn.batch_first is False
    with torch.no_grad():
        for name, _, adapter in monatune.adapter_modules(batch_first):
            for p in adapter.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            seq_first.get_submodule(name).load_state_dict(adapter.state_dict())
        batch_first.eval(), seq_first.eval()
        got, expected = seq_first(X), batch_first(X)
        plain = make_tower()(X)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3


@pytest.mark.parametrize("batch_first", [True, False])
def test_vpt_block_is_the_plain_block_on_the_prompted_sequence(batch_first):
    tower = make_tower(batch_first=batch_first).eval()
    plain = copy.deepcopy(tower.transformer.resblocks[0])
    monatune.apply(tower, "vpt", num_tokens=3)
    block = tower.transformer.resblocks[0]
    x = torch.randn(2, 17, 32)
    prompts = block.prompt.default.tokens.expand(2, -1, -1)
    sequence = torch.cat([x[:, :1], prompts, x[:, 1:]], 1)
    with torch.no_grad():
        if batch_first:
            expected, got = plain(sequence), block(x)
        else:
            expected, got = plain(sequence.transpose(0, 1)).transpose(0, 1), block(x.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(got, torch.cat([expected[:, :1], expected[:, 4:]], 1))


METHODS_THAT_APPLY = ["full", "fixed", "bitfit", "norm", "partial-1", "ssf", "lora", "mona", "adapter", "adaptformer",
                      "lorand", "vpt"]  # fmt: skip


@pytest.mark.parametrize("method", METHODS_THAT_APPLY)
def test_training_step_changes_exactly_the_method_params(method):
    options = {"modules": ["fc1", "fc2"], "rank": 2} if method == "lora" else {}
    check_training_step(make_tower, method, X, last_block="transformer.resblocks.1", **options)


def test_the_methods_that_apply_and_lora_on_the_attention_is_refused():
    assert set(METHODS) == set(METHODS_THAT_APPLY)
    tower = make_tower()
    with pytest.raises(ValueError, match=r"open_clip image tower blocks have no q, v projection.*\['fc1', 'fc2'\]"):
        monatune.apply(tower, "lora")
    assert not monatune.is_tuned(tower)


@pytest.mark.parametrize("method", ["mona", "lora"])
def test_adapter_round_trip(method, tmp_path):
    check_round_trip(make_tower(), method, X, tmp_path, **({"modules": ["fc1", "fc2"]} if method == "lora" else {}))


def test_the_grid_follows_the_image_size_and_leaves_with_the_adapters():
    tower = make_tower()
    with torch.no_grad():  # a positional embedding resized for 48 px images (6 x 6 patches + class)
        tower.positional_embedding = torch.nn.Parameter(torch.randn(37, 32) * 0.1)
    check_identity(tower, torch.randn(1, 3, 48, 48), "mona", bottleneck=8)
    grid = tower.transformer.resblocks[0].token_grid
    assert isinstance(grid, ConvGrid) and grid.hw == (6, 6) and grid.num_prefix_tokens == 1
    monatune.unapply(tower)
    assert type(tower.transformer.resblocks[0]) is ResidualAttentionBlock
    assert not tower.conv1._forward_pre_hooks
    assert not any("token_grid" in m.__dict__ or "_monatune_grid" in m.__dict__ for m in tower.modules())


def test_a_clip_model_is_refused_its_image_tower_tunes():
    clip = make_clip()
    refused = r"CLIP has 2 open_clip ResidualAttentionBlock\(s\) outside an image tower .*apply\(clip.visual, ...\)"
    for method in ("mona", "lora", "partial-1", "adapter", "vpt"):  # refused while planning: nothing changed
        with pytest.raises(ValueError, match=refused):
            monatune.apply(clip, method)
        assert not monatune.is_tuned(clip) and all(p.requires_grad for p in clip.parameters())
        assert not any(isinstance(m, TunedBlockMixin) for m in clip.modules())
    clip = make_clip()
    monatune.apply(clip.visual, "mona", bottleneck=8)
    assert all(type(b) is ResidualAttentionBlock for b in clip.transformer.resblocks)  # the text tower
    text = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        image_features, text_features, _ = clip(X, text)
    assert image_features.shape == text_features.shape == (2, 16)
