"""drop_path="outside": the STAR-MMRotate fork's Adapter and LoRand, Adapter(DropPath(branch)) before the residual add."""
import pytest
import torch
from timm.layers import DropPath

import monatune

SWIN = "swin_tiny_patch4_window7_224"
TINY = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def backbone(method, side, seed=0):
    torch.manual_seed(seed)
    return monatune.build_dense_backbone(SWIN, method, model_kwargs=TINY, drop_path=side)


@pytest.mark.parametrize("method", ["adapter", "lorand"])
def test_outside_adapts_the_dropped_branch_and_inside_drops_the_adapted_one(method):
    x = torch.randn(1, 14, 14, 32)
    for side in ("inside", "outside"):
        block = backbone(method, side).layers[0].blocks[0]
        block.drop_path1, block.drop_path2 = DropPath(1.0), DropPath(1.0)  # every branch dropped
        block.train()
        attn, mlp = block.attn_out["default"], block.mlp_out["default"]
        with torch.no_grad():
            out = block(x)
            if side == "inside":  # x + DropPath(A(y)): nothing added
                expected = x
            else:  # x + A(DropPath(y)) = x + A(0), twice
                expected = x + attn(torch.zeros_like(x))
                expected = expected + mlp(torch.zeros_like(x))
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("method", ["adapter", "lorand"])
def test_in_eval_both_sides_compute_the_same(method):
    x = torch.randn(1, 3, 64, 64)
    inside, outside = backbone(method, "inside").eval(), backbone(method, "outside").eval()
    with torch.no_grad():
        for key, value in inside(x).items():
            torch.testing.assert_close(outside(x)[key], value, rtol=0, atol=0)


def test_bad_side_is_a_one_line_error():
    with pytest.raises(ValueError, match="adapter option `drop_path` must be 'inside'"):
        monatune.methods.resolve_method("adapter", {"drop_path": "after"})
