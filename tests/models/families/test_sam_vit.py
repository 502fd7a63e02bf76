"""timm SAM ViT (models/sam_vit.py): the tuned block, the methods that apply, the neck as a head, the dense backbone."""
from __future__ import annotations

import json

import pytest
import torch
from family_checks import check_dense, check_identity, check_round_trip, check_training_step, expected_trainable
from timm.models.vision_transformer_sam import VisionTransformerSAM

import monatune
from monatune.cli import main
from monatune.methods import METHODS
from monatune.models.dense import build_dense_backbone

METHODS_THAT_APPLY = ["full", "fixed", "bitfit", "norm", "partial-1", "ssf", "lora", "mona", "adapter", "adaptformer",
                      "lorand"]  # fmt: skip
X = torch.randn(2, 3, 64, 64)


def make_model(num_classes: int = 0, **kwargs) -> VisionTransformerSAM:
    """A tiny SAM ViT: a 4 x 4 map, block 0 in 3 x 3 windows (padded to 6 x 6), block 1 global. Position
    embeddings start at zero in timm; random here, so that they shape the outputs."""
    model = VisionTransformerSAM(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, window_size=3,
                                 global_attn_indexes=(1,), use_rel_pos=True, neck_chans=16, num_classes=num_classes,
                                 **kwargs)  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos" in name:
                p.normal_(0.0, 0.1)
    return model


def test_identity_adapters_change_nothing():
    check_identity(make_model(), X, "mona")
    check_identity(make_model(), X, "lora", modules=["q", "k", "v", "proj", "fc1", "fc2"])


@pytest.mark.parametrize("method", METHODS_THAT_APPLY)
def test_training_step_changes_exactly_the_method_params(method):
    check_training_step(make_model, method, X, last_block="blocks.1")


def test_lora_on_every_projection_trains():
    model = check_training_step(make_model, "lora", X, modules=("q", "k", "v", "proj", "fc1", "fc2"), rank=2)
    assert len(list(monatune.adapter_modules(model))) == 4 * 2  # qkv, proj, fc1, fc2 in each block


def test_neck_is_frozen_unless_named():
    model = monatune.apply(make_model(num_classes=5), "mona")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(model, "mona", head=("head",))  # the classifier, not the neck
    assert not any(n.startswith("neck.") for n in trainable)
    check_training_step(lambda: make_model(num_classes=5), "mona", X, head=("neck",))
    check_training_step(lambda: make_model(num_classes=5), "mona", X, head=("neck", "head"))


def test_methods_are_all_known_and_vpt_is_refused():
    assert set(METHODS) - set(METHODS_THAT_APPLY) == {"vpt"}
    model = make_model()
    with pytest.raises(ValueError, match="vpt needs tokens.*timm SAM ViT"):
        monatune.apply(model, "vpt")
    assert not monatune.is_tuned(model)


@pytest.mark.parametrize("method", ["mona", "lora"])
def test_adapter_round_trip(method, tmp_path):
    check_round_trip(make_model(), method, X, tmp_path)


def test_dense_backbone_any_size():
    kwargs = dict(embed_dim=32, depth=4, num_heads=2, window_size=3, global_attn_indexes=(1, 3))
    backbone = build_dense_backbone("samvit_base_patch16", "mona", model_kwargs=kwargs, bottleneck=8)
    assert not backbone.hierarchical and backbone.out_indices == [0, 1, 2, 3]
    assert not any(n.startswith("neck.") for n, _ in backbone.named_parameters())  # maps are taken before it
    check_dense(backbone, [(33, 47), (64, 64), (17, 90)], channels=[32] * 4, strides=[16] * 4)
    plain = build_dense_backbone("samvit_base_patch16", model_kwargs=kwargs)
    check_identity(plain, torch.randn(1, 3, 45, 71), "mona", bottleneck=8)  # resampled positions, padded windows


@pytest.mark.parametrize("fused", [True, False])
def test_dense_backbone_computes_what_timm_computes(fused):
    """The dense backbone's own window partition and relative positions (written for symbolic sizes: one graph for
    every size under torch.compile, tests/deploy/test_compile.py) give timm's block outputs, with windows padded and
    the global block's relative positions resampled (a 6 x 7 map, not the 4 x 4 they were made for)."""
    kwargs = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, window_size=4, global_attn_indexes=(1,))
    backbone = build_dense_backbone("samvit_base_patch16", model_kwargs=kwargs).eval()
    torch.manual_seed(0)
    timm_model = VisionTransformerSAM(patch_size=16, use_rel_pos=True, **kwargs).eval()
    with torch.no_grad():
        for p in timm_model.parameters():
            p.normal_(0.0, 0.2)
    backbone.load_state_dict(timm_model.state_dict(), strict=False)
    for model in (backbone, timm_model):
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = fused
    x = torch.randn(2, 3, 96, 112)
    with torch.no_grad():
        options = dict(indices=[0, 1], norm=False, output_fmt="NCHW", intermediates_only=True)
        found, expected = (m.forward_intermediates(x, **options) for m in (backbone, timm_model))
    for f, e in zip(found, expected, strict=True):
        assert f.shape == (2, 32, 6, 7)
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-5)


def test_params_cli_counts_the_monas(capsys):
    assert main(["params", "samvit_base_patch16", "--method", "mona", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    per_block = 2 * sum(p.numel() for p in METHODS["mona"]().build(768).parameters())
    assert report["trainable_backbone"] == report["adapter"] == report["trainable"] == 12 * per_block
    assert report["head"] == 0 and report["model"] == "samvit_base_patch16"
    assert 88_000_000 < report["backbone"] < 90_000_000  # SAM ViT-B's encoder without its neck
