"""Where the methods go in Hugging Face ``transformers`` vision backbones: ViT, DINOv2 (with and without
registers), Swin, Swin V2 and SAM's vision encoder.

Each tuned layer is the installed transformers layer (5.x) with the slots added; its forward is the
installed forward line for line otherwise, extra arguments (attention masks, ``always_partition``,
``output_attentions``, attention kwargs) included. See :mod:`monatune.models.base` for which method
fills which slot. transformers' ``hidden_dropout`` on a branch counts as part of the branch.

ViT (``ViTLayer``), DINOv2 (``Dinov2Layer``, ``Dinov2WithRegistersLayer``); pre-norm, LayerScale in
DINOv2 only, one DropPath module shared by both branches in DINOv2, none in ViT::

    x = [prefix, prompts, patches]                   # slot "prompt" (VPT)
    x = x + DropPath(attn_out(LayerScale(Attention(LN1(x)))))
    x = after_attn(x)                                # Mona_1
    x = x + DropPath(mlp_out(LayerScale(MLP(LN2(x))))) + mlp_parallel(x)
    x = after_mlp(x)                                 # Mona_2
    x = [prefix, patches]

The stream is (B, P + H*W, C), the class token (and DINOv2's register tokens) first. Mona needs the
patch grid: a forward pre-hook on the model's patch-embedding convolution reads it off every input,
so any image size works (``interpolate_pos_encoding=True`` for ViT; DINOv2 always interpolates).

Swin (``SwinLayer``): pre-norm; transformers puts DropPath on the attention branch only::

    x = x + DropPath(attn_out(WindowAttention(LN1(x))))
    x = after_attn(x)                                # Mona_1
    x = x + mlp_out(MLP(LN2(x))) + mlp_parallel(x)
    x = after_mlp(x)                                 # Mona_2

Swin V2 (``Swinv2Layer``): res-post-norm, one DropPath for both branches::

    x = x + DropPath(attn_out(LN1(WindowAttention(x))))
    x = after_attn(x)                                # Mona_1
    x = x + DropPath(mlp_out(LN2(MLP(x)))) + mlp_parallel(x)
    x = after_mlp(x)                                 # Mona_2

The Swin stream is (B, H*W, C), its grid the layer's ``input_dimensions`` argument. No ``prompt``
slot: prompts would have to join each window inside the attention (timm Swin v1 has that) or, for
V2, the cosine attention's continuous position bias, which has no entries for them. The tuned layers
compute transformers' padded, shifted windows with sizes written for ``torch.compile(dynamic=True)``, and
while a Swin is tuned its patch embedding and patch merging pad the same way (``attach_swin_padding``):
one graph for every input size.

SAM vision encoder (``SamVisionLayer``): pre-norm on a (B, H, W, C) map, no DropPath, no ``prompt``
slot (windowed and global attention with decomposed relative positions of the map)::

    x = x + attn_out(Attention(LN1(x)))
    x = after_attn(x)                                # Mona_1
    x = x + mlp_out(MLP(LN2(x))) + mlp_parallel(x)
    x = after_mlp(x)                                 # Mona_2

LoRA: ViT, DINOv2 and Swin have separate query/key/value linears (``q``, ``k``, ``v``), SAM a fused
``qkv``; DINOv2's SwiGLU MLP (``use_swiglu_ffn``) has no ``fc1``/``fc2``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings, Dinov2Layer
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersEmbeddings,
    Dinov2WithRegistersLayer,
)
from transformers.models.sam.modeling_sam import SamVisionLayer
from transformers.models.swin.modeling_swin import SwinLayer, SwinPatchEmbeddings, SwinPatchMerging
from transformers.models.swinv2.modeling_swinv2 import Swinv2Layer, Swinv2PatchEmbeddings, Swinv2PatchMerging
from transformers.models.vit.modeling_vit import ViTEmbeddings, ViTLayer

from .base import TunedBlockMixin
from .dense import ceil_div, crop
from .registry import BlockRule, register_block
from .vit import TokenGrid

__all__ = [
    "PatchGrid",
    "TunedViTLayer",
    "TunedDinov2Layer",
    "TunedDinov2WithRegistersLayer",
    "TunedSwinLayer",
    "TunedSwinv2Layer",
    "TunedSamVisionLayer",
    "attach_patch_grid",
    "detach_patch_grid",
]

#: The embeddings whose ``patch_embeddings.projection`` gives the token grid of ViT / DINOv2 layers.
TOKEN_EMBEDDINGS = (ViTEmbeddings, Dinov2Embeddings, Dinov2WithRegistersEmbeddings)


class PatchGrid(TokenGrid):
    """The token grid of a transformers ViT/DINOv2, read off the input of its patch convolution."""

    def __call__(self, conv: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook on the patch embedding's ``projection`` convolution (padding 0)."""
        if self.pinned:
            return
        size = args[0].shape[-2:]
        self.hw = tuple((s - k) // st + 1 for s, k, st in zip(size, conv.kernel_size, conv.stride))


def _grid_owners(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "embeddings", None), TOKEN_EMBEDDINGS)]


def attach_patch_grid(model: nn.Module, blocks: Sequence[nn.Module]) -> None:
    """Give ``blocks`` the :class:`PatchGrid` of the innermost module around them that holds their
    ``embeddings`` (``ViTModel``, ``Dinov2Model``, ...), kept current by a hook on its patch convolution."""
    members = [(owner, {id(m) for m in owner.modules()}) for owner in _grid_owners(model)]
    for block in blocks:
        inside = [owner for owner, ids in members if id(block) in ids]
        if not inside:
            raise ValueError(
                f"{type(model).__name__} has transformers {type(block).__name__}s but no ViT/DINOv2 `embeddings` "
                "around them, so the patch grid is unknown; pass the ViTModel / Dinov2Model (or a model holding "
                "one, e.g. ViTForImageClassification) to monatune.apply"
            )
        owner = min(inside, key=lambda o: sum(1 for _ in o.modules()))  # the innermost
        grid = owner.__dict__.get("_monatune_grid")
        if grid is None:
            embeddings = owner.embeddings
            patch = embeddings.patch_embeddings
            registers = getattr(embeddings, "register_tokens", None)
            prefix = 1 + (registers.shape[1] if registers is not None else 0)  # class (+ register) tokens
            hw = (patch.image_size[0] // patch.patch_size[0], patch.image_size[1] // patch.patch_size[1])
            grid = PatchGrid(prefix, hw)
            owner._monatune_grid = grid  # where monatune.set_token_grid finds it
            patch.projection.register_forward_pre_hook(grid)
        block.token_grid = grid


def detach_patch_grid(model: nn.Module) -> None:
    """Undo :func:`attach_patch_grid` for every grid no tuned layer uses any more."""
    for owner in _grid_owners(model):
        grid = owner.__dict__.get("_monatune_grid")
        if not isinstance(grid, PatchGrid):
            continue
        if any(isinstance(m, TunedBlockMixin) and m.__dict__.get("token_grid") is grid for m in owner.modules()):
            continue
        del owner.__dict__["_monatune_grid"]
        hooks = owner.embeddings.patch_embeddings.projection._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if hook is grid]:
            del hooks[key]
        for module in owner.modules():
            if module.__dict__.get("token_grid") is grid:
                del module.__dict__["token_grid"]


class _LayerMixin(TunedBlockMixin):
    def _mlp_half(self, x: Tensor, branch: Tensor, drop_path: nn.Module | None, **grid: Any) -> Tensor:
        """``x + drop_path(mlp_out(branch)) + mlp_parallel(x)``, then ``after_mlp``."""
        x = self._mlp_residual(x, branch, drop_path)
        return self._adapt("after_mlp", x, **grid)


class _TokenLayerMixin(_LayerMixin):
    token_grid: PatchGrid

    def _grid(self) -> dict[str, Any]:
        return {"hw": self.token_grid.hw, "num_prefix_tokens": self.token_grid.num_prefix_tokens}

    def _enter_prompts(self, x: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, nn.Module | None]:
        """``x`` with the VPT prompts inserted after the prefix tokens, and the prompt module (None: no VPT)."""
        prompt = self._slot("prompt")
        if prompt is None:
            return x, None
        if attention_mask is not None:
            raise ValueError("VPT prompts cannot be combined with an attention mask")
        P = self.token_grid.num_prefix_tokens
        return torch.cat([x[:, :P], prompt.enter(x.shape[0], x), x[:, P:]], dim=1), prompt

    def _leave_prompts(self, x: Tensor, prompt: nn.Module | None) -> Tensor:
        if prompt is None:
            return x
        P, n = self.token_grid.num_prefix_tokens, prompt.num_tokens
        prompt.leave(x[:, P : P + n])
        return torch.cat([x[:, :P], x[:, P + n :]], dim=1)


class TunedViTLayer(ViTLayer, _TokenLayerMixin):
    """transformers ``ViTLayer`` with adapter slots (class swapped in, never built)."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        x, prompt = self._enter_prompts(hidden_states, attention_mask)
        y, _ = self.attention(self.layernorm_before(x), attention_mask, **kwargs)
        x = x + self._branch("attn_out", self.dropout(y), None)
        x = self._adapt("after_attn", x, **self._grid())
        x = self._mlp_half(x, self.dropout(self.mlp(self.layernorm_after(x))), None, **self._grid())
        return self._leave_prompts(x, prompt)


class _Dinov2Forward(_TokenLayerMixin):
    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        x, prompt = self._enter_prompts(hidden_states, attention_mask)
        y, _ = self.attention(self.norm1(x), attention_mask=attention_mask, **kwargs)
        x = x + self._branch("attn_out", self.layer_scale1(y), self.drop_path)
        x = self._adapt("after_attn", x, **self._grid())
        x = self._mlp_half(x, self.layer_scale2(self.mlp(self.norm2(x))), self.drop_path, **self._grid())
        return self._leave_prompts(x, prompt)


class TunedDinov2Layer(Dinov2Layer, _Dinov2Forward):
    """transformers ``Dinov2Layer`` with adapter slots (class swapped in, never built)."""

    forward = _Dinov2Forward.forward


class TunedDinov2WithRegistersLayer(Dinov2WithRegistersLayer, _Dinov2Forward):
    """transformers ``Dinov2WithRegistersLayer`` (the same forward as ``Dinov2Layer``) with adapter slots."""

    forward = _Dinov2Forward.forward


def _windows(layer: nn.Module, y: Tensor) -> tuple[Tensor, Tensor | None, tuple[int, ...]]:
    """transformers' Swin window partition of a (B, H, W, C) map (pad to whole windows, then shift): the windows
    (B * nW, ws * ws, C), the shift mask and the geometry for :func:`_unwindows`. The padded size is written with
    ``ceil_div`` (transformers' ``maybe_pad`` pads with ``(ws - W % ws) % ws``: see monatune.models.dense)."""
    B, H, W, C = y.shape
    ws, shift = layer.window_size, layer.shift_size
    nh, nw = ceil_div(H, ws), ceil_div(W, ws)
    y = F.pad(y, (0, 0, 0, nw * ws - W, 0, nh * ws - H))
    if shift > 0:
        y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
    mask = layer.get_attn_mask(nh * ws, nw * ws, dtype=y.dtype, device=y.device)
    return y.view(B, nh, ws, nw, ws, C).transpose(2, 3).reshape(-1, ws * ws, C), mask, (B, H, W, nh, nw, ws, shift)


def _unwindows(windows: Tensor, geometry: tuple[int, ...]) -> Tensor:
    """The inverse of :func:`_windows`, as tokens (B, H * W, C)."""
    B, H, W, nh, nw, ws, shift = geometry
    y = windows.view(B, nh, nw, ws, ws, -1).transpose(2, 3).reshape(B, nh * ws, nw * ws, -1)
    if shift > 0:
        y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
    return crop(y, H, W).reshape(B, H * W, -1)


class _PaddedSwinPatchEmbeddings(SwinPatchEmbeddings):
    """transformers' patch embedding, padding to the patch size with ``ceil_div`` (its ``if W % p``: a graph per
    divisibility pattern under torch.compile)."""

    def maybe_pad(self, pixel_values: Tensor, height: int, width: int) -> Tensor:
        (ph, pw) = self.patch_size
        return F.pad(pixel_values, (0, ceil_div(width, pw) * pw - width, 0, ceil_div(height, ph) * ph - height))


class _PaddedSwinPatchMerging(SwinPatchMerging):
    """transformers' patch merging, padding odd sizes with ``ceil_div`` (its ``if H % 2 == 1``, as above)."""

    def maybe_pad(self, input_feature: Tensor, height: int, width: int) -> Tensor:
        return F.pad(input_feature, (0, 0, 0, ceil_div(width, 2) * 2 - width, 0, ceil_div(height, 2) * 2 - height))


class _PaddedSwinv2PatchEmbeddings(Swinv2PatchEmbeddings):
    maybe_pad = _PaddedSwinPatchEmbeddings.maybe_pad


class _PaddedSwinv2PatchMerging(Swinv2PatchMerging):
    maybe_pad = _PaddedSwinPatchMerging.maybe_pad


_PADDED = {SwinPatchEmbeddings: _PaddedSwinPatchEmbeddings, SwinPatchMerging: _PaddedSwinPatchMerging,
           Swinv2PatchEmbeddings: _PaddedSwinv2PatchEmbeddings, Swinv2PatchMerging: _PaddedSwinv2PatchMerging}  # fmt: skip


def attach_swin_padding(model: nn.Module, blocks: Sequence[nn.Module]) -> None:
    """A tuned transformers Swin's patch embedding and merging pad as its tuned layers do (same results)."""
    for module in model.modules():
        if type(module) in _PADDED:
            module.__class__ = _PADDED[type(module)]


def detach_swin_padding(model: nn.Module) -> None:
    """Undo :func:`attach_swin_padding`."""
    originals = {padded: original for original, padded in _PADDED.items()}
    for module in model.modules():
        if type(module) in originals:
            module.__class__ = originals[type(module)]


class TunedSwinLayer(SwinLayer, _LayerMixin):
    """transformers ``SwinLayer`` with adapter slots (class swapped in, never built)."""

    def forward(
        self, hidden_states: Tensor, input_dimensions: tuple[int, int], always_partition: bool = False, **kwargs: Any
    ) -> tuple[Tensor, Tensor | None]:
        if not always_partition:
            self.set_shift_and_window_size(input_dimensions)
        height, width = input_dimensions
        batch_size, _, channels = hidden_states.size()
        windows, attn_mask, geometry = _windows(self, self.layernorm_before(hidden_states).view(
            batch_size, height, width, channels))  # fmt: skip
        y, attn_weights = self.attention(windows, attn_mask, **kwargs)
        y = _unwindows(self.dropout(y), geometry)

        hw = (height, width)
        x = hidden_states + self._branch("attn_out", y, self.drop_path)
        x = self._adapt("after_attn", x, hw=hw)
        x = self._mlp_half(x, self.dropout(self.mlp(self.layernorm_after(x))), None, hw=hw)
        return x, attn_weights


class TunedSwinv2Layer(Swinv2Layer, _LayerMixin):
    """transformers ``Swinv2Layer`` with adapter slots (class swapped in, never built)."""

    def forward(
        self, hidden_states: Tensor, input_dimensions: tuple[int, int], output_attentions: bool | None = False
    ) -> tuple[Tensor, ...]:
        height, width = input_dimensions
        batch_size, _, channels = hidden_states.size()
        windows, attn_mask, geometry = _windows(self, hidden_states.view(batch_size, height, width, channels))
        attention_outputs = self.attention(windows, attn_mask, output_attentions=output_attentions)
        y = _unwindows(attention_outputs[0], geometry)

        hw = (height, width)
        x = hidden_states + self._branch("attn_out", self.layernorm_before(y), self.drop_path)
        x = self._adapt("after_attn", x, hw=hw)
        y = self.layernorm_after(self.output(self.intermediate(x)))
        x = self._mlp_half(x, y, self.drop_path, hw=hw)
        return (x, attention_outputs[1]) if output_attentions else (x,)


class TunedSamVisionLayer(SamVisionLayer, _LayerMixin):
    """transformers ``SamVisionLayer`` with adapter slots (class swapped in, never built)."""

    def forward(self, hidden_states: Tensor) -> Tensor:  # B, H, W, C
        y = self.layer_norm1(hidden_states)
        if self.window_size > 0:
            height, width = y.shape[1], y.shape[2]
            y, padding_shape = self.window_partition(y, self.window_size)
        y, _ = self.attn(hidden_states=y)
        if self.window_size > 0:
            y = self.window_unpartition(y, self.window_size, padding_shape, (height, width))
        x = hidden_states + self._branch("attn_out", y, None)
        x = self._adapt("after_attn", x)
        return self._mlp_half(x, self.mlp(self.layer_norm2(x)), None)


_SEPARATE_QKV = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "proj": "attention.o_proj",
                 "fc1": "mlp.fc1", "fc2": "mlp.fc2"}  # fmt: skip
_TOKEN_SLOTS = ("prompt", "attn_out", "after_attn", "mlp_parallel", "mlp_out", "after_mlp")
_MAP_SLOTS = ("attn_out", "after_attn", "mlp_parallel", "mlp_out", "after_mlp")

register_block(BlockRule(
    block=ViTLayer, tuned=TunedViTLayer, family="transformers ViT", slots=_TOKEN_SLOTS,
    grid="tokens: class token + patch grid (B, 1 + H*W, C)", width=lambda b: b.layernorm_before.normalized_shape[0],
    linears=_SEPARATE_QKV, attach=attach_patch_grid, detach=detach_patch_grid,
))
register_block(BlockRule(
    block=Dinov2Layer, tuned=TunedDinov2Layer, family="transformers DINOv2", slots=_TOKEN_SLOTS,
    grid="tokens: class token + patch grid (B, 1 + H*W, C)", width=lambda b: b.norm1.normalized_shape[0],
    linears=_SEPARATE_QKV, attach=attach_patch_grid, detach=detach_patch_grid,
))
register_block(BlockRule(
    block=Dinov2WithRegistersLayer, tuned=TunedDinov2WithRegistersLayer, family="transformers DINOv2 with registers",
    slots=_TOKEN_SLOTS, grid="tokens: class + register tokens + patch grid (B, 1 + R + H*W, C)",
    width=lambda b: b.norm1.normalized_shape[0], linears=_SEPARATE_QKV, attach=attach_patch_grid,
    detach=detach_patch_grid,
))
register_block(BlockRule(
    block=SwinLayer, tuned=TunedSwinLayer, family="transformers Swin", slots=_MAP_SLOTS,
    grid="tokens: patch grid (B, H*W, C), (H, W) = input_dimensions",
    width=lambda b: b.layernorm_before.normalized_shape[0], linears=_SEPARATE_QKV, attach=attach_swin_padding,
    detach=detach_swin_padding,
))
register_block(BlockRule(
    block=Swinv2Layer, tuned=TunedSwinv2Layer, family="transformers Swin V2", slots=_MAP_SLOTS,
    grid="tokens: patch grid (B, H*W, C), (H, W) = input_dimensions",
    width=lambda b: b.layernorm_before.normalized_shape[0],
    linears={"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "proj": "attention.output.dense", "fc1": "intermediate.dense", "fc2": "output.dense"},
    attach=attach_swin_padding, detach=detach_swin_padding,
))
register_block(BlockRule(
    block=SamVisionLayer, tuned=TunedSamVisionLayer, family="transformers SAM vision encoder", slots=_MAP_SLOTS,
    grid="NHWC map", width=lambda b: b.layer_norm1.normalized_shape[0],
    linears={"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.lin1", "fc2": "mlp.lin2"},
))
