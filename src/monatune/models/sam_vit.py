"""Where the methods go in a timm SAM ViT block (``timm.models.vision_transformer_sam``, ``samvit_*``).

The image encoder of Segment Anything (Kirillov et al., ICCV 2023) is ViTDet's plain ViT: blocks
on a channels-last (B, H, W, C) map, most attending within windows (the map padded to whole
windows), a few globally, with decomposed relative positions. With every slot (see
:mod:`monatune.models.base` for which method fills which slot)::

    y = windows(LN1(x))                                 # global blocks: the whole map
    x = x + unwindows(DropPath(attn_out(LayerScale(Attention(y)))))
    x = after_attn(x)                                   # Mona_1
    x = x + DropPath(mlp_out(LayerScale(MLP(LN2(x))))) + mlp_parallel(x)
    x = after_mlp(x)                                    # Mona_2

An empty slot is skipped. timm applies the first DropPath to the windows (one draw per window),
and so does the tuned block; ``attn_out`` modules act per token, so the window padding they also
see is cropped away. There is no ``prompt`` slot: windows and relative positions fix the token
layout (no VPT). The neck (``model.neck``, convolutions to 256 channels) is not a block: it stays
frozen unless named as a head (``monatune.apply(model, "mona", head=["neck", "head"])``).

The dense backbone (:class:`DenseSamViT`) returns four evenly spaced blocks' outputs as maps at
the patch stride (16), each through an output norm, like :class:`monatune.models.vit.DenseViT`;
the neck is dropped (the detection and segmentation heads build their own pyramid). Any input
size: it is zero-padded to a multiple of the patch size, timm resamples the absolute position
embedding, the global blocks' relative positions are interpolated to the map, and windowed
blocks pad the map to whole windows themselves. The dense backbone's blocks and attentions run
monatune's window partition and relative positions (timm's results, written so that
``torch.compile(dynamic=True)`` builds one graph for every input size).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer_sam import Attention, Block, VisionTransformerSAM
from torch import Tensor, nn

from .base import TunedBlockMixin, swap_class
from .dense import create_timm_model, window_partition, window_unpartition
from .registry import BlockRule, DenseRule, register_block, register_dense
from .vit import _DenseTokens

__all__ = ["TunedSamViTBlock", "SamRelPosAttention", "DenseSamViT", "build_dense_sam_vit"]


# timm's get_rel_pos, with the same results, written so that a symbolic size under torch.compile(dynamic=True) is
# not fixed: timm sizes the relative positions with ``int(...)`` (which fixes the map's size: a graph per input size).
# The windows are monatune.models.dense's, for the same reason (timm pads with the modulo form).
def relative_positions(size: int, rel_pos: Tensor) -> Tensor:
    """timm's ``get_rel_pos`` for queries and keys on the same side (self-attention): (size, size, C)."""
    length = 2 * size - 1
    if rel_pos.shape[0] != length:  # resampled linearly, as timm does
        rel_pos = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
        rel_pos = rel_pos.reshape(-1, length).permute(1, 0)
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + (size - 1)]


class SamRelPosAttention(Attention):
    """timm's SAM ``Attention`` with relative positions, the bias built by :func:`relative_positions` (swapped in)."""

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, _ = x.shape
        N = H * W
        qkv = self.qkv(x.reshape(B, N, -1)).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, N, -1).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        r_q = q.reshape(q.shape[0], H, W, -1)  # timm's get_decomposed_rel_pos_bias
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, relative_positions(H, self.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, relative_positions(W, self.rel_pos_w))
        bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(-1, N, N)
        if self.fused_attn:
            dropout = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        x = x.view(B, self.num_heads, N, -1).transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x)).view(B, H, W, -1)


class TunedSamViTBlock(Block, TunedBlockMixin):
    """A timm SAM ViT ``Block`` with adapter slots (class swapped in, never built)."""

    def forward(self, x: Tensor) -> Tensor:  # B, H, W, C
        H, W = x.shape[1:3]
        y = self.norm1(x)
        if self.window_size > 0:
            y, grid = window_partition(y, (self.window_size,) * 2)  # B * windows, size, size, C
        y = self._branch("attn_out", self.ls1(self.attn(y)), self.drop_path1)
        if self.window_size > 0:
            y = window_unpartition(y, (H, W), grid)  # B, H, W, C
        x = self._adapt("after_attn", x + y)
        x = self._mlp_residual(x, self.ls2(self.mlp(self.norm2(x))), self.drop_path2)
        return self._adapt("after_mlp", x)


class DenseSamViT(VisionTransformerSAM, _DenseTokens):
    """A timm VisionTransformerSAM returning chosen block outputs as maps (class swapped in)."""

    forward = _DenseTokens.forward
    map_blocks = True


def build_dense_sam_vit(name: str, out_indices: Sequence[int] | None, kwargs: dict[str, Any]) -> DenseSamViT:
    """The SAM image encoder without its neck, returning block outputs at the patch stride for any input size."""
    model = create_timm_model(name, pretrained=False, num_classes=0, **kwargs)
    if type(model) is not VisionTransformerSAM:
        raise ValueError(f"{name!r} builds a timm {type(model).__name__}, not a VisionTransformerSAM")
    swap_class(model, DenseSamViT)
    model.neck = nn.Identity()  # the maps are taken before it
    # one graph for every input size under torch.compile(dynamic=True): the input comes padded to the patch size
    # (without this timm's divisibility check formats the size into a message, fixing it), the tuned block's
    # window partition and the attention's relative positions written for symbolic sizes (see window_partition)
    model.patch_embed.dynamic_img_pad = True
    for module in model.modules():
        if type(module) is Block:
            swap_class(module, TunedSamViTBlock)
        elif type(module) is Attention and module.use_rel_pos:
            swap_class(module, SamRelPosAttention)
    model._describe_blocks(out_indices)
    return model


register_block(BlockRule(
    block=Block, tuned=TunedSamViTBlock, family="timm SAM ViT",
    slots=("attn_out", "after_attn", "mlp_parallel", "mlp_out", "after_mlp"),
    grid="NHWC map; window or global attention with relative positions",
    width=lambda block: block.norm1.normalized_shape[0],
    linears={"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
))
register_dense(DenseRule(family="timm SAM ViT (samvit_*)", timm_modules=("vision_transformer_sam",),
                         build=build_dense_sam_vit, hierarchical=False))
