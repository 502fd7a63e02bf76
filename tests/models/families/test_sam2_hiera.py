"""SAM 2's Hiera trunk (package sam2): every method on its blocks; on a whole ImageEncoder only the trunk is tuned."""
from __future__ import annotations

import pytest
import torch
from family_checks import check_identity, check_round_trip, check_training_step

pytest.importorskip("sam2")
from sam2.modeling.backbones.hieradet import Hiera  # noqa: E402
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder  # noqa: E402
from sam2.modeling.position_encoding import PositionEmbeddingSine  # noqa: E402

import monatune  # noqa: E402
from monatune.models.sam2_hiera import TunedSam2HieraBlock  # noqa: E402

METHODS = ["full", "fixed", "bitfit", "norm", "partial-1", "ssf", "lora", "mona", "adapter", "adaptformer", "lorand"]


def tiny_trunk() -> Hiera:
    """Windowed attention (4x4 windows, 2x2 in the last stage) except block 2 (global); blocks 1, 3, 4 pool."""
    return Hiera(embed_dim=16, num_heads=1, stages=(1, 2, 1, 1), global_att_blocks=(2,),
                 window_pos_embed_bkg_spatial_size=(4, 4), window_spec=(4, 4, 4, 2))  # fmt: skip


def tiny_encoder() -> ImageEncoder:
    trunk = tiny_trunk()
    neck = FpnNeck(PositionEmbeddingSine(num_pos_feats=32), d_model=32, backbone_channel_list=trunk.channel_list,
                   fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")  # fmt: skip
    return ImageEncoder(trunk, neck, scalp=1)


@pytest.mark.parametrize("method", ["mona", "lora"])
def test_identity_adapters_give_the_original(method):
    model = check_identity(tiny_trunk(), torch.randn(2, 3, 64, 64), method)
    tuned = [type(b) is TunedSam2HieraBlock for b in model.blocks]  # LoRA tunes the linears, not the blocks
    assert all(tuned) if method == "mona" else type(model.blocks[1].attn.qkv).__name__ == "TunedLinear"


@pytest.mark.parametrize("method", METHODS)
def test_training_step_changes_exactly_the_method_params(method):
    check_training_step(tiny_trunk, method, torch.randn(2, 3, 64, 64), last_block="blocks.4")


def test_vpt_is_refused():
    with pytest.raises(ValueError, match="vpt needs tokens.*SAM 2 Hiera"):
        monatune.apply(tiny_trunk(), "vpt")


@pytest.mark.parametrize("head", [(), ("neck",)])
def test_image_encoder_tunes_the_trunk_only(head):
    """Mona goes into the trunk's blocks; the neck trains only when named in ``head``."""
    model = check_training_step(tiny_encoder, "mona", torch.randn(2, 3, 64, 64), head=head)
    names = [name for name, _, _ in monatune.adapter_modules(model)]
    assert len(names) == 2 * 5 and all(n.startswith("trunk.blocks.") for n in names)
    assert all(p.requires_grad == bool(head) for p in model.neck.parameters())


def test_image_encoder_identity_round_trip_and_input_sizes(tmp_path):
    check_identity(tiny_encoder(), torch.randn(1, 3, 64, 64), "mona")
    check_round_trip(tiny_encoder(), "mona", torch.randn(1, 3, 64, 64), tmp_path)
    model = monatune.apply(tiny_encoder(), "mona").eval()
    for size in (64, 96):
        with torch.no_grad():
            out = model(torch.randn(1, 3, size, size))
        assert [tuple(f.shape) for f in out["backbone_fpn"]] == [(1, 32, size // s, size // s) for s in (4, 8, 16)]
