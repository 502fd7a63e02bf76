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
embedding and interpolates the global blocks' relative positions to the map, and windowed
blocks pad the map to whole windows themselves.
"""
from __future__ import annotations

from typing import Any, Sequence

from timm.models.vision_transformer_sam import Block, VisionTransformerSAM, window_partition, window_unpartition
from torch import Tensor, nn

from .base import TunedBlockMixin, swap_class
from .dense import create_timm_model
from .registry import BlockRule, DenseRule, register_block, register_dense
from .vit import _DenseTokens

__all__ = ["TunedSamViTBlock", "DenseSamViT", "build_dense_sam_vit"]


class TunedSamViTBlock(Block, TunedBlockMixin):
    """A timm SAM ViT ``Block`` with adapter slots (class swapped in, never built)."""

    def forward(self, x: Tensor) -> Tensor:  # B, H, W, C
        H, W = x.shape[1:3]
        y = self.norm1(x)
        pad_hw = None
        if self.window_size > 0:
            y, pad_hw = window_partition(y, self.window_size)  # B * windows, size, size, C
        y = self._branch("attn_out", self.ls1(self.attn(y)), self.drop_path1)
        if self.window_size > 0:
            y = window_unpartition(y, self.window_size, (H, W), pad_hw)  # B, H, W, C
        x = self._adapt("after_attn", x + y)
        x = self._mlp_residual(x, self.ls2(self.mlp(self.norm2(x))), self.drop_path2)
        return self._adapt("after_mlp", x)


class DenseSamViT(VisionTransformerSAM, _DenseTokens):
    """A timm VisionTransformerSAM returning chosen block outputs as maps (class swapped in)."""

    forward = _DenseTokens.forward


def build_dense_sam_vit(name: str, out_indices: Sequence[int] | None, kwargs: dict[str, Any]) -> DenseSamViT:
    """The SAM image encoder without its neck, returning block outputs at the patch stride for any input size."""
    model = create_timm_model(name, pretrained=False, num_classes=0, **kwargs)
    if type(model) is not VisionTransformerSAM:
        raise ValueError(f"{name!r} builds a timm {type(model).__name__}, not a VisionTransformerSAM")
    swap_class(model, DenseSamViT)
    model.neck = nn.Identity()  # the maps are taken before it
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
