"""Where the methods go in Segment Anything's image encoder (package ``segment_anything``).

Imported by the registry once ``segment_anything`` is. Its ``ImageEncoderViT`` blocks
(``segment_anything.modeling.image_encoder.Block``) are timm SAM ViT's (see
:mod:`monatune.models.sam_vit`) without DropPath or LayerScale, and with the MLP's linears
named ``lin1``/``lin2``. With every slot::

    y = windows(LN1(x))                                 # global blocks: the whole map
    x = x + attn_out(unwindows(Attention(y)))
    x = after_attn(x)                                   # Mona_1
    x = x + mlp_out(MLPBlock(LN2(x))) + mlp_parallel(x)
    x = after_mlp(x)                                    # Mona_2

An empty slot is skipped; the stream is a channels-last (B, H, W, C) map. No ``prompt`` slot:
windows and relative positions fix the token layout (no VPT).

Applied to a whole ``Sam``, the block methods go into the image encoder's blocks only; the prompt
encoder and the mask decoder are no blocks and stay frozen unless named as heads
(``monatune.apply(sam, "mona", head=["mask_decoder"])``), like the encoder's neck. Methods that
act on every layer of a type (bitfit, norm, ssf) reach every part of the model given: pass
``sam.image_encoder`` to keep them in the encoder. The encoder's absolute position embedding is
sized for ``img_size``, so inputs stay at that size (1024 for the released models).
"""
from __future__ import annotations

from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition
from torch import Tensor

from .base import TunedBlockMixin
from .registry import BlockRule, register_block

__all__ = ["TunedSamBlock"]


class TunedSamBlock(Block, TunedBlockMixin):
    """A ``segment_anything`` image-encoder ``Block`` with adapter slots (class swapped in, never built)."""

    def forward(self, x: Tensor) -> Tensor:  # B, H, W, C
        y = self.norm1(x)
        if self.window_size > 0:
            H, W = y.shape[1], y.shape[2]
            y, pad_hw = window_partition(y, self.window_size)  # B * windows, size, size, C
        y = self.attn(y)
        if self.window_size > 0:
            y = window_unpartition(y, self.window_size, pad_hw, (H, W))  # B, H, W, C
        x = self._adapt("after_attn", x + self._adapt("attn_out", y))
        x = self._mlp_residual(x, self.mlp(self.norm2(x)), None)
        return self._adapt("after_mlp", x)


register_block(BlockRule(
    block=Block, tuned=TunedSamBlock, family="segment_anything SAM image encoder",
    slots=("attn_out", "after_attn", "mlp_parallel", "mlp_out", "after_mlp"),
    grid="NHWC map; window or global attention with relative positions",
    width=lambda block: block.norm1.normalized_shape[0],
    linears={"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.lin1", "fc2": "mlp.lin2"},
))
