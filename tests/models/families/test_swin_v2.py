"""timm Swin V2 (models/swin_v2.py): the tuned block, the methods that apply, the dense backbone."""
from __future__ import annotations

import json

import pytest
import torch
from family_checks import check_dense, check_identity, check_round_trip, check_training_step
from timm.models.swin_transformer_v2 import SwinTransformerV2, SwinTransformerV2Block

import monatune
from monatune.cli import main
from monatune.methods import METHODS
from monatune.models.dense import build_dense_backbone

METHODS_THAT_APPLY = ["full", "fixed", "bitfit", "norm", "partial-1", "ssf", "lora", "mona", "adapter", "adaptformer",
                      "lorand"]  # fmt: skip
TINY = dict(embed_dim=16, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4))
X = torch.randn(2, 3, 64, 64)


def make_model() -> SwinTransformerV2:
    """A tiny Swin V2 (maps 16, 8, 4, 2; windows 4, shifted in the first two stages). timm starts the
    post-norms at zero, which would silence the branches; they start near one here."""
    model = SwinTransformerV2(img_size=64, window_size=4, num_classes=0, **TINY)
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, SwinTransformerV2Block):
                block.norm1.weight.normal_(1.0, 0.1)
                block.norm2.weight.normal_(1.0, 0.1)
    return model


def test_identity_adapters_change_nothing():
    check_identity(make_model(), X, "mona")
    model = check_identity(make_model(), X, "lora", modules=["q", "k", "v", "proj", "fc1", "fc2"])
    attn = model.layers[0].blocks[0].attn
    assert attn.qkv_bias_separate  # F.linear(x, qkv.weight, bias) would bypass the tuned qkv
    monatune.unapply(model)
    assert not attn.qkv_bias_separate


@pytest.mark.parametrize("method", METHODS_THAT_APPLY)
def test_training_step_changes_exactly_the_method_params(method):
    check_training_step(make_model, method, X, last_block="layers.3.blocks.0")


def test_lora_on_every_projection_trains():
    model = check_training_step(make_model, "lora", X, modules=("q", "k", "v", "proj", "fc1", "fc2"), rank=2)
    hosts = {name.rsplit(".lora.", 1)[0] for name, _, _ in monatune.adapter_modules(model)}
    assert len(hosts) == 4 * 6  # qkv, proj, fc1, fc2 in each of the 6 blocks


def test_methods_are_all_known_and_vpt_is_refused():
    assert set(METHODS) - set(METHODS_THAT_APPLY) == {"vpt"}
    model = make_model()
    with pytest.raises(ValueError, match="vpt needs tokens.*timm Swin V2"):
        monatune.apply(model, "vpt")
    assert not monatune.is_tuned(model)


@pytest.mark.parametrize("method", ["mona", "lora"])
def test_adapter_round_trip(method, tmp_path):
    check_round_trip(make_model(), method, X, tmp_path)


def test_dense_backbone_any_size():
    backbone = build_dense_backbone("swinv2_tiny_window8_256", "mona", model_kwargs=TINY, bottleneck=8)
    assert backbone.hierarchical and backbone.model_name == "swinv2_tiny_window8_256"
    check_dense(backbone, [(33, 47), (64, 64), (17, 90)], channels=[16, 32, 64, 128], strides=[4, 8, 16, 32])
    plain = build_dense_backbone("swinv2_tiny_window8_256", model_kwargs=TINY)
    check_identity(plain, torch.randn(1, 3, 45, 71), "mona", bottleneck=8)  # padded windows, masks built per size
    some = build_dense_backbone("swinv2_tiny_window8_256", out_indices=[1, 3], model_kwargs=TINY).eval()
    with torch.no_grad():
        maps = some(torch.randn(1, 3, 33, 47))
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"1": (1, 32, 5, 6), "3": (1, 128, 2, 2)}
    assert not hasattr(some, "norm0")


def test_dense_backbone_computes_what_timm_computes():
    """The dense blocks' windows and patch merging (written for torch.compile) against timm's own ``_attn`` and
    ``PatchMerging`` on the same weights: shifted windows over padded maps, odd sizes merged."""
    from timm.models.swin_transformer_v2 import PatchMerging

    from monatune.models.swin_v2 import DensePatchMergingV2, TunedSwinV2Block

    torch.manual_seed(0)
    backbone = build_dense_backbone("swinv2_tiny_window8_256", "mona", bottleneck=8,
                                    model_kwargs=dict(TINY, img_size=64, window_size=4)).eval()  # fmt: skip
    blocks = [m for m in backbone.modules() if isinstance(m, TunedSwinV2Block)]
    merges = [m for m in backbone.modules() if type(m) is DensePatchMergingV2]
    assert len(blocks) == 6 and len(merges) == 3 and all(b.dense_windows for b in blocks)
    assert [b.shift_size for b in blocks[:2]] == [(0, 0), (2, 2)]
    for block in blocks:  # post-norms away from timm's zero start, so every branch counts
        block.norm1.weight.data.normal_(1.0, 0.1)
        block.norm2.weight.data.normal_(1.0, 0.1)
    with torch.no_grad():
        for size in [(64, 64), (33, 47), (97, 131)]:
            x = torch.randn(2, 3, *size)
            dense = backbone(x)
            for block in blocks:
                block.dense_windows = False
            for merge in merges:
                merge.__class__ = PatchMerging
            timm_maps = backbone(x)
            for block in blocks:
                block.dense_windows = True
            for merge in merges:
                merge.__class__ = DensePatchMergingV2
            for key in dense:
                torch.testing.assert_close(dense[key], timm_maps[key], rtol=0, atol=1e-6)


def test_dense_rule_claims_swin_v2_only():
    with pytest.raises(ValueError, match="not one of the families"):
        build_dense_backbone("swinv2_cr_tiny_224")  # timm's other Swin V2 module


def test_params_cli_counts_the_monas(capsys):
    assert main(["params", "swinv2_tiny_window8_256", "--method", "mona", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    mona = METHODS["mona"]()
    expected = sum(2 * depth * sum(p.numel() for p in mona.build(96 * 2**i).parameters())
                   for i, depth in enumerate((2, 2, 6, 2)))  # fmt: skip
    assert report["trainable_backbone"] == report["adapter"] == report["trainable"] == expected
    assert report["head"] == 0 and report["model"] == "swinv2_tiny_window8_256"
    assert 27_000_000 < report["backbone"] < 28_500_000  # Swin V2-T without its classifier
