"""Where the methods go in SAM 2's Hiera image encoder (package ``sam2``, ``sam2.modeling.backbones.hieradet``).

SAM 2 (Ravi et al., "SAM 2: Segment Anything in Images and Videos", 2024) encodes images with a
Hiera trunk whose blocks (``MultiScaleBlock``) keep the stream as a channels-last (B, H, W, C)
map, attend within windows (global attention in a few blocks) and, at a stage's first block,
widen the stream (``dim -> dim_out``) and halve the map by max-pooling the queries and the
projected shortcut. The block's forward, with every slot (see :mod:`monatune.models.base`)::

    s = x, or maxpool(proj(LN1(x)))                     # a stage's first block: dim -> dim_out, q-pooled
    x = s + DropPath(attn_out(WindowAttention(LN1(x))))
    x = after_attn(x)                                   # Mona_1
    x = x + DropPath(mlp_out(MLP(LN2(x)))) + mlp_parallel(x)
    x = after_mlp(x)                                    # Mona_2

An empty slot is skipped; the slots' width is the block's ``dim_out``. There is no ``prompt``
slot (no VPT): the windows and the windowed position embedding fix the layout. Applied to a whole
``ImageEncoder`` (trunk + ``FpnNeck``), the block methods tune the trunk's blocks only; the neck has
no blocks and stays frozen unless named in ``head=`` (``monatune.apply(encoder, "mona",
head=["neck"])``). SAM 2 is not a timm model, so it has no dense rule: its ``ImageEncoder`` already
returns the feature pyramid.
"""
from __future__ import annotations

from sam2.modeling.backbones.hieradet import MultiScaleBlock, do_pool
from sam2.modeling.backbones.utils import window_partition, window_unpartition
from torch import Tensor

from .base import TunedBlockMixin
from .registry import BlockRule, register_block

__all__ = ["TunedSam2HieraBlock"]


class TunedSam2HieraBlock(MultiScaleBlock, TunedBlockMixin):
    """SAM 2's ``MultiScaleBlock`` with adapter slots (class swapped in, never built)."""

    def forward(self, x: Tensor) -> Tensor:  # B, H, W, C
        x = self._attn_branch(x)
        x = self._adapt("after_attn", x)
        x = self._mlp_residual(x, self.mlp(self.norm2(x)), self.drop_path)
        return self._adapt("after_mlp", x)

    def _attn_branch(self, x: Tensor) -> Tensor:
        """``shortcut + DropPath(attn_out(attention))``: sam2's forward up to its first residual add."""
        shortcut = x  # B, H, W, C
        x = self.norm1(x)
        if self.dim != self.dim_out:  # project and pool the shortcut
            shortcut = do_pool(self.proj(x), self.pool)
        window_size = self.window_size
        if window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, window_size)
        x = self.attn(x)  # window attention, queries pooled at a stage change
        if self.q_stride:  # the windows shrank with the queries
            window_size = self.window_size // self.q_stride[0]
            H, W = shortcut.shape[1:3]
            pad_h = (window_size - H % window_size) % window_size
            pad_w = (window_size - W % window_size) % window_size
            pad_hw = (H + pad_h, W + pad_w)
        if self.window_size > 0:
            x = window_unpartition(x, window_size, pad_hw, (H, W))
        return shortcut + self._branch("attn_out", x, self.drop_path)


register_block(BlockRule(
    block=MultiScaleBlock, tuned=TunedSam2HieraBlock, family="SAM 2 Hiera (sam2)",
    slots=("attn_out", "after_attn", "mlp_parallel", "mlp_out", "after_mlp"), grid="NHWC map",
    width=lambda block: block.dim_out,
    linears={"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.layers.0", "fc2": "mlp.layers.1"},
))
