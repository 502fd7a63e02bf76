"""Where the methods go in a timm Swin Transformer V2 block (``timm.models.swin_transformer_v2``, ``swinv2_*``).

Swin V2 (Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", CVPR 2022)
normalises each residual branch after it (res-post-norm) instead of before. The block's
forward, with every slot (see :mod:`monatune.models.base` for which method fills which slot)::

    x = x + DropPath(attn_out(LN1(WindowAttention(x))))
    x = after_attn(x)                                   # Mona_1
    x = x + DropPath(mlp_out(LN2(MLP(x)))) + mlp_parallel(x)
    x = after_mlp(x)                                    # Mona_2

An empty slot is skipped. The stream is a channels-last (B, H, W, C) map throughout (timm
flattens it to (B, H*W, C) around the MLP, which computes the same), so Mona never copies it.
There is no ``prompt`` slot: the attention is cosine attention with a continuous position bias
computed for the window's token pairs, which has no place for prepended tokens (no VPT).

LoRA. The attention's ``qkv`` linear has no bias of its own; timm keeps separate ``q_bias`` and
``v_bias`` and by default calls ``F.linear(x, qkv.weight, bias)``, which would skip a tuned
``qkv``. :func:`monatune.tuning.apply` switches such an attention to timm's own
``qkv_bias_separate`` path (``qkv(x) + bias``, the same result) when it tunes ``qkv``, as for EVA.

The dense backbone (:class:`DenseSwinV2`) returns stage i's output through its output norm
``norm{i}``, strides 4, 8, 16, 32, for any input size: timm builds the shift masks per forward
(``strict_img_size=False``), pads each map to whole windows and pads odd maps before patch merging;
the input is zero-padded on the right/bottom to a multiple of the patch size. Window sizes are
timm's for the model's ``img_size`` (a stage whose pre-training map fits in one window has no
shift), so pretrained weights see the windows they were trained with.
"""
from __future__ import annotations

from typing import Any, Sequence

from timm.models.swin_transformer_v2 import SwinTransformerV2, SwinTransformerV2Block
from torch import Tensor, nn

from .base import TunedBlockMixin, swap_class
from .dense import DenseMixin, create_timm_model
from .swin import DenseSwin
from .registry import BlockRule, DenseRule, register_block, register_dense

__all__ = ["TunedSwinV2Block", "DenseSwinV2", "build_dense_swin_v2"]


class TunedSwinV2Block(SwinTransformerV2Block, TunedBlockMixin):
    """A timm ``SwinTransformerV2Block`` with adapter slots (class swapped in, never built)."""

    def forward(self, x: Tensor) -> Tensor:  # B, H, W, C
        x = x + self._branch("attn_out", self.norm1(self._attn(x)), self.drop_path1)
        x = self._adapt("after_attn", x)
        x = self._mlp_residual(x, self.norm2(self.mlp(x)), self.drop_path2)
        return self._adapt("after_mlp", x)


class DenseSwinV2(SwinTransformerV2, DenseMixin):
    """A timm SwinTransformerV2 returning its stage maps (class swapped in).

    ``out_indices`` are the stages returned (keys ``"i"``), each with its output norm ``norm{i}``;
    ``out_channels`` and ``strides`` describe every stage, returned or not.
    """

    forward = DenseSwin.forward  # the same stages on an NHWC map as Swin v1


def build_dense_swin_v2(name: str, out_indices: Sequence[int] | None, kwargs: dict[str, Any]) -> DenseSwinV2:
    """A dense Swin V2 for any input size: masks built per forward, a norm per returned stage."""
    model = create_timm_model(name, pretrained=False, num_classes=0, strict_img_size=False, **kwargs)
    if type(model) is not SwinTransformerV2:
        raise ValueError(f"{name!r} builds a timm {type(model).__name__}, not a SwinTransformerV2")
    swap_class(model, DenseSwinV2)
    model.norm = nn.Identity()  # the classifier's final norm is not part of the dense backbone
    model._describe_stages([i["num_chs"] for i in model.feature_info], [i["reduction"] for i in model.feature_info],
                           out_indices)  # fmt: skip
    return model


register_block(BlockRule(
    block=SwinTransformerV2Block, tuned=TunedSwinV2Block, family="timm Swin V2",
    slots=("attn_out", "after_attn", "mlp_parallel", "mlp_out", "after_mlp"),
    grid="NHWC map; cosine window attention with a continuous position bias",
    width=lambda block: block.dim,  # the first linear is the position-bias MLP's (2 -> 512)
    linears={"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
))
register_dense(DenseRule(family="timm Swin V2 (swinv2_*)", timm_modules=("swin_transformer_v2",),
                         build=build_dense_swin_v2, hierarchical=True))
