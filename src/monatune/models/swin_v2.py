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
``norm{i}``, strides 4, 8, 16, 32, for any input size: as timm does with ``strict_img_size=False``,
each block shifts, pads the map to whole windows and builds the shift mask on the padded map, and
patch merging pads odd maps; the input is zero-padded on the right/bottom to a multiple of the patch
size. Its blocks and patch mergings compute timm's results with sizes written for
``torch.compile(dynamic=True)`` (one graph for every input size; see :mod:`monatune.models.swin`). Window sizes are
timm's for the model's ``img_size`` (a stage whose pre-training map fits in one window has no
shift), so pretrained weights see the windows they were trained with.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from timm.models.swin_transformer_v2 import PatchMerging, SwinTransformerV2, SwinTransformerV2Block
from torch import Tensor, nn

from .base import TunedBlockMixin, swap_class
from .dense import DenseMixin, create_timm_model, window_partition, window_unpartition
from .swin import DenseSwin, merge_patches, shift_mask
from .registry import BlockRule, DenseRule, register_block, register_dense

__all__ = ["TunedSwinV2Block", "DensePatchMergingV2", "DenseSwinV2", "build_dense_swin_v2"]


class TunedSwinV2Block(SwinTransformerV2Block, TunedBlockMixin):
    """A timm ``SwinTransformerV2Block`` with adapter slots (class swapped in, never built)."""

    dense_windows: bool = False  # set on the dense backbone's blocks: ``_dense_attn`` instead of timm's ``_attn``

    def forward(self, x: Tensor) -> Tensor:  # B, H, W, C
        attn = self._dense_attn if self.dense_windows else self._attn
        x = x + self._branch("attn_out", self.norm1(attn(x)), self.drop_path1)
        x = self._adapt("after_attn", x)
        x = self._mlp_residual(x, self.norm2(self.mlp(x)), self.drop_path2)
        return self._adapt("after_mlp", x)

    def _dense_attn(self, x: Tensor) -> Tensor:
        """timm's ``_attn`` with a mask built per size (shift, pad to whole windows, mask on the padded map), its
        sizes written with ``ceil_div``: timm's ``(w - H % w) % w`` padding and the crop's strides made
        ``torch.compile(dynamic=True)`` take minutes over sympy for one size (see models/swin.py)."""
        H, W = x.shape[1:3]
        shifted = any(self.shift_size)
        if shifted:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        windows, grid = window_partition(x, self.window_size)  # B * nW, wh, ww, C
        mask = shift_mask(self, grid[0] * self.window_size[0], grid[1] * self.window_size[1], x) if shifted else None
        y = self.attn(windows.flatten(1, 2), mask=mask).view(windows.shape)
        x = window_unpartition(y, (H, W), grid)
        return torch.roll(x, shifts=self.shift_size, dims=(1, 2)) if shifted else x


class DensePatchMergingV2(PatchMerging):
    """timm's Swin V2 ``PatchMerging`` (reduction, then norm) on :func:`monatune.models.swin.merge_patches`."""

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.reduction(merge_patches(x)))


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
    for module in model.modules():
        if isinstance(module, SwinTransformerV2Block):
            swap_class(module, TunedSwinV2Block)
            module.dense_windows = True
        elif type(module) is PatchMerging:
            swap_class(module, DensePatchMergingV2)
    # the input comes padded to the patch size; timm's divisibility check would format (and so fix) a symbolic size
    model.patch_embed.dynamic_img_pad = True
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
