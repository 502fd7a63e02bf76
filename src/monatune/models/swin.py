"""Where the methods go in a timm Swin Transformer block, and the release's window partition.

The block's forward, with every slot (spec section 3 for Mona; see
:mod:`monatune.models.base` for which method fills which slot)::

    x = x + DropPath(attn_out(WindowAttention(LN1(x), prompts)))
    x = after_attn(x)                                   # Mona_1 (release: my_module_1)
    x = x + DropPath(mlp_out(MLP(LN2(x)))) + mlp_parallel(x)
    x = after_mlp(x)                                    # Mona_2 (release: my_module_2)

An empty slot is skipped. The stream is a channels-last (B, H, W, C) map throughout, so
Mona never copies it.

Window partition. timm 1.0 (without ``always_partition``) shrinks the window and drops the
shift on maps smaller than the window, and with dynamic sizes pads *after* the cyclic
shift. The release's dense backbone keeps the window fixed, pads the map to whole windows
*before* the shift and builds the shift mask on the padded map. ``release_windows = True``
(set on the dense backbone's blocks by :func:`build_dense_swin`) selects that behaviour.

The dense backbone (:class:`DenseSwin`) returns stage i's output (before the next patch merging)
through its output norm ``norm{i}``, strides 4, 8, 16, 32; the input is zero-padded on the
right/bottom to a multiple of the patch size.

VPT prompts (slot ``prompt``) join every window's tokens inside the attention, with zero
relative-position bias and no shift mask, as in the VPT authors' Swin code.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
    window_partition,
    window_reverse,
)
from torch import Tensor, nn

from .base import TunedBlockMixin, swap_class
from .dense import DenseMixin, ceil_div, create_timm_model, crop
from .registry import BlockRule, DenseRule, register_block, register_dense

__all__ = ["TunedSwinBlock", "DenseSwin", "build_dense_swin", "freeze_stages", "release_shift_mask", "shift_mask",
           "merge_patches", "prompted_window_attention"]


def release_shift_mask(
    hp: int, wp: int, window: tuple[int, int], shift: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Shifted-window attention mask (num_windows, N, N) for a padded hp x wp map, as the release builds it."""
    img_mask = torch.zeros((1, hp, wp, 1), device=device, dtype=dtype)
    region = 0
    for h in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for w in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            img_mask[:, h, w, :] = region
            region += 1
    windows = window_partition(img_mask, window).flatten(1)  # nW, N
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def prompted_window_attention(
    attn: WindowAttention, windows: Tensor, mask: Tensor | None, prompts: Tensor
) -> tuple[Tensor, Tensor]:
    """timm's window attention with ``prompts`` (B, n, C) prepended to every window.

    Returns the windows' outputs (nW*B, N, C) and the prompts' outputs averaged over the
    windows of each image (B, n, C).
    """
    B, n, C = prompts.shape
    nWB, N, _ = windows.shape
    nW = nWB // B
    x = torch.cat([prompts.unsqueeze(1).expand(B, nW, n, C).reshape(nWB, n, C), windows], dim=1)
    T = n + N
    q, k, v = attn.qkv(x).reshape(nWB, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = F.pad(attn._get_rel_pos_bias(), (n, 0, n, 0))  # 1, heads, T, T; zero for prompts
    if mask is not None:
        shift = F.pad(mask, (n, 0, n, 0)).to(bias.dtype)  # nW, T, T
        bias = (bias.unsqueeze(1) + shift.unsqueeze(1).unsqueeze(0)).expand(B, -1, -1, -1, -1)
        bias = bias.reshape(nWB, attn.num_heads, T, T)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    y = attn.proj_drop(attn.proj(y.transpose(1, 2).reshape(nWB, T, -1)))
    return y[:, n:], y[:, :n].reshape(B, nW, n, -1).mean(1)


class TunedSwinBlock(SwinTransformerBlock, TunedBlockMixin):
    """A timm ``SwinTransformerBlock`` with adapter slots (class swapped in, never built)."""

    release_windows: bool = False

    def forward(self, x: Tensor) -> Tensor:  # B, H, W, C
        prompt = self._slot("prompt")
        tokens = prompt.enter(x.shape[0], x) if prompt is not None else None  # B, n, C
        attn = self._release_attn if self.release_windows else self._timm_attn
        y, prompt_out = attn(self.norm1(x), None if tokens is None else self.norm1(tokens))
        x = x + self._branch("attn_out", y, self.drop_path1)
        x = self._adapt("after_attn", x)
        x = self._mlp_residual(x, self.mlp(self.norm2(x)), self.drop_path2)
        x = self._adapt("after_mlp", x)
        if prompt is not None and prompt.carries:  # shallow VPT: the prompts go through the block too
            tokens = tokens + self.drop_path1(prompt_out)
            prompt.leave(tokens + self.drop_path2(self.mlp(self.norm2(tokens))))
        return x

    def _window_attention(
        self, windows: Tensor, mask: Tensor | None, prompts: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        if prompts is None:
            return self.attn(windows, mask=mask), None
        return prompted_window_attention(self.attn, windows, mask, prompts)

    def _timm_attn(self, x: Tensor, prompts: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """timm's ``_attn`` (shift, then pad), with prompts."""
        if prompts is None:
            return self._attn(x), None
        B, H, W, C = x.shape
        shifted = any(self.shift_size)
        if shifted:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        pad_h = (self.window_size[0] - H % self.window_size[0]) % self.window_size[0]
        pad_w = (self.window_size[1] - W % self.window_size[1]) % self.window_size[1]
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        mask = self.get_attn_mask(x) if getattr(self, "dynamic_mask", False) else self.attn_mask
        windows = window_partition(x, self.window_size).view(-1, self.window_area, C)
        windows, prompt_out = self._window_attention(windows, mask, prompts)
        x = window_reverse(windows.view(-1, *self.window_size, C), self.window_size, Hp, Wp)[:, :H, :W, :]
        if shifted:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x, prompt_out

    def _release_attn(self, x: Tensor, prompts: Tensor | None) -> tuple[Tensor, Tensor | None]:
        B, H, W, C = x.shape
        wh, ww = self.window_size
        # whole windows as a ceiling division (not ``(w - H % w) % w``): with symbolic sizes under torch.compile
        # every later shape is then a product of ``(H + w - 1) // w``, which sympy keeps small; the modulo form
        # nests through every block and patch merging and made a dynamic-shape compile take minutes
        nh, nw = ceil_div(H, wh), ceil_div(W, ww)
        Hp, Wp = nh * wh, nw * ww
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))  # pad to whole windows BEFORE the shift
        shifted = any(self.shift_size)
        if shifted:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
            mask = shift_mask(self, Hp, Wp, x)
        else:
            mask = None
        windows = x.view(B, nh, wh, nw, ww, C).transpose(2, 3).reshape(-1, wh * ww, C)  # nW*B, N, C
        windows, prompt_out = self._window_attention(windows, mask, prompts)
        x = windows.view(B, nh, nw, wh, ww, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        if shifted:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return crop(x, H, W), prompt_out


def shift_mask(block: nn.Module, hp: int, wp: int, x: Tensor) -> Tensor:
    """``release_shift_mask`` for ``block``'s window and shift on an hp x wp map like ``x``, kept on the block for
    the last size seen (a dense backbone sees one size per batch)."""
    args = (hp, wp, block.window_size, block.shift_size, x.device, x.dtype)
    if torch.compiler.is_compiling():  # built in the graph: a dict keyed by symbolic sizes would specialise them
        return release_shift_mask(*args)
    key = (hp, wp, x.device, x.dtype)
    cache = block.__dict__.setdefault("_release_mask_cache", {})
    if key not in cache:
        cache.clear()
        cache[key] = release_shift_mask(*args)
    return cache[key]


def merge_patches(x: Tensor) -> Tensor:
    """timm's patch merging gather (odd sizes padded by one): (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C), the
    padded size written as ``2 * ceil(H / 2)`` so symbolic sizes stay small under torch.compile (see
    ``TunedSwinBlock._release_attn``)."""
    B, H, W, C = x.shape
    h, w = ceil_div(H, 2), ceil_div(W, 2)
    x = F.pad(x, (0, 0, 0, 2 * w - W, 0, 2 * h - H))
    return x.reshape(B, h, 2, w, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)


class ReleasePatchMerging(PatchMerging):
    """timm's Swin v1 ``PatchMerging`` (norm, then reduction) on :func:`merge_patches`."""

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(self.norm(merge_patches(x)))


class DenseSwin(SwinTransformer, DenseMixin):
    """A timm SwinTransformer returning its stage maps (class swapped in).

    ``out_indices`` are the stages returned (keys ``"i"``), each with its output norm ``norm{i}``;
    ``out_channels`` and ``strides`` describe every stage, returned or not.
    """

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":  # type: ignore[override]
        x = self.patch_embed(self._pad_to_patch(x))  # B, H/4, W/4, C
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i in self.out_indices:
                out[str(i)] = self._output(i, x)  # B, C_i, H_i, W_i
        return out


def build_dense_swin(name: str, out_indices: Sequence[int] | None, kwargs: dict[str, Any]) -> DenseSwin:
    """The release's dense Swin v1: fixed windows padded before the shift, a norm per returned stage."""
    model = create_timm_model(name, pretrained=False, num_classes=0, always_partition=True, strict_img_size=False,
                              **kwargs)  # fmt: skip
    if type(model) is not SwinTransformer:
        raise ValueError(f"{name!r} builds a timm {type(model).__name__}, not a Swin v1 SwinTransformer")
    swap_class(model, DenseSwin)
    for block in model.modules():
        if type(block) is SwinTransformerBlock:
            swap_class(block, TunedSwinBlock)
            block.release_windows = True
        elif type(block) is PatchMerging:
            swap_class(block, ReleasePatchMerging)
    model.norm = nn.Identity()  # the classifier's final norm is not part of the dense backbone
    # the input comes padded to the patch size (_pad_to_patch); without this timm checks divisibility with an
    # f-string naming the size, which specialises a symbolic size under torch.compile (one graph per size)
    model.patch_embed.dynamic_img_pad = True
    model._describe_stages([i["num_chs"] for i in model.feature_info], [i["reduction"] for i in model.feature_info],
                           out_indices)  # fmt: skip
    return model


def freeze_stages(backbone: nn.Module, frozen_stages: int) -> None:
    """The release's Swin ``_freeze_stages``, on top of any method: freeze the first parts of a dense Swin.

    ``frozen_stages >= 0`` freezes the patch embedding, ``>= 1`` also the absolute position
    embedding (if any), ``>= 2`` also stages ``0 .. frozen_stages - 2`` (mmdetection's Swin
    configs; the release's VOC RetinaNet sets 1: the patch embedding is frozen for every method,
    full fine-tuning included). Negative: nothing. ``requires_grad`` is what changes.
    """
    if frozen_stages < 0:
        return
    if not isinstance(backbone, DenseSwin):
        raise ValueError(f"`frozen_stages` applies to dense Swin backbones, got {type(backbone).__name__}")
    parts: list[nn.Module] = [backbone.patch_embed]
    parts += list(backbone.layers)[: max(frozen_stages - 1, 0)]
    for part in parts:
        for p in part.parameters():
            p.requires_grad_(False)
    pos = getattr(backbone, "absolute_pos_embed", None)
    if frozen_stages >= 1 and isinstance(pos, nn.Parameter):
        pos.requires_grad_(False)


register_block(BlockRule(
    block=SwinTransformerBlock, tuned=TunedSwinBlock, family="timm Swin v1",
    slots=("prompt", "attn_out", "after_attn", "mlp_parallel", "mlp_out", "after_mlp"), grid="NHWC map",
    linears={"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
))
register_dense(DenseRule(family="timm Swin v1 (swin_*)", timm_modules=("swin_transformer",), build=build_dense_swin,
                         hierarchical=True))
