"""Where the methods go in timm ViT-family blocks (ViT, DeiT, DINOv2, EVA).

As in Swin (see :mod:`monatune.models.base` for which method fills which slot)::

    x = [prefix, prompts, patches]                  # slot "prompt" (VPT; ViT only)
    x = x + DropPath(attn_out(LayerScale(Attention(LN1(x)))))
    x = after_attn(x)                               # Mona_1
    x = x + DropPath(mlp_out(LayerScale(MLP(LN2(x))))) + mlp_parallel(x)
    x = after_mlp(x)                                # Mona_2
    x = [prefix, patches]                           # the prompts leave (and are carried on, shallow)

The stream is (B, N, C) with the prefix tokens (class, distillation and register tokens)
first and the patch tokens after them. Mona lays the patch tokens out on their grid for
its convolutions and treats each prefix token as an isolated 1x1 map (only the kernels'
centre taps act on it). The grid follows the input: a forward pre-hook on the model's
patch embedding records it on every call, so dynamic image sizes work.

The dense backbone (:class:`DenseViT`, :class:`DenseEva`) returns the outputs of chosen blocks
as maps at the patch stride, prefix tokens dropped, each through an output norm; any input size
(padded to the patch size).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
from timm.models.eva import Eva, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from .base import TunedBlockMixin, swap_class
from .dense import DenseMixin, ceil_div, create_timm_model
from .registry import BlockRule, DenseRule, register_block, register_dense

__all__ = ["TokenGrid", "TunedViTBlock", "TunedEvaBlock", "DenseViT", "DenseEva", "attach_token_grid",
           "detach_token_grid", "build_dense_vit", "set_token_grid"]


class TokenGrid:
    """The patch grid of the current forward, shared by all blocks of one model.

    ``hw`` is one (H, W), or a list of them for packed sequences (several images' tokens one after
    another along N, each with its own prefix tokens; see :func:`set_token_grid`).
    """

    def __init__(self, num_prefix_tokens: int, hw: tuple[int, int] | list[tuple[int, int]]) -> None:
        self.num_prefix_tokens = num_prefix_tokens
        self.hw = hw
        self.pinned = False  # set by set_token_grid: the hook leaves hw alone

    def __call__(self, patch_embed: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook on the patch embedding: read the grid off the image size."""
        if self.pinned:
            return
        H, W = args[0].shape[-2:]
        if getattr(patch_embed, "dynamic_img_pad", False):  # timm's dynamic_feat_size, without its math.ceil: under
            (ph, pw) = patch_embed.patch_size  # tracing (the TorchScript ONNX exporter) that would fix the size
            self.hw = (ceil_div(H, ph), ceil_div(W, pw))
        else:
            feat = getattr(patch_embed, "dynamic_feat_size", None)
            self.hw = tuple(feat((H, W))) if feat is not None else tuple(patch_embed.grid_size)


def _is_vit(module: nn.Module) -> bool:
    return hasattr(module, "patch_embed") and hasattr(module, "num_prefix_tokens")


def _owner(members: list[tuple[nn.Module, set[int]]], block: nn.Module) -> nn.Module | None:
    """The innermost ViT (of ``members``: each with the ids of its modules) around ``block``."""
    inside = [(len(ids), owner) for owner, ids in members if id(block) in ids]
    return min(inside, key=lambda t: t[0])[1] if inside else None


def _vits(model: nn.Module) -> list[tuple[nn.Module, set[int]]]:
    return [(m, {id(x) for x in m.modules()}) for m in model.modules() if _is_vit(m)]


def check_token_grid(model: nn.Module, blocks: Sequence[nn.Module]) -> None:
    """Refuse ViT blocks with no ViT (a module with ``patch_embed`` and ``num_prefix_tokens``) around them."""
    members = _vits(model)
    if any(_owner(members, block) is None for block in blocks):
        raise ValueError(
            f"{type(model).__name__} has ViT blocks but no `patch_embed`/`num_prefix_tokens` around them; pass "
            "a timm VisionTransformer / Eva model (or a module holding one, or a monatune dense backbone) "
            "to monatune.apply"
        )


def attach_token_grid(model: nn.Module, blocks: Sequence[nn.Module]) -> None:
    """Give ``blocks`` the :class:`TokenGrid` of the ViT they belong to (``model`` or the innermost module
    in it with a ``patch_embed`` and ``num_prefix_tokens``), kept current by a hook on its patch embedding."""
    check_token_grid(model, blocks)
    members = _vits(model)
    for block in blocks:
        owner = _owner(members, block)
        grid = owner.__dict__.get("_monatune_grid")
        if grid is None:
            grid = TokenGrid(int(owner.num_prefix_tokens), tuple(owner.patch_embed.grid_size))
            owner._monatune_grid = grid
            owner.patch_embed.register_forward_pre_hook(grid)
        block.token_grid = grid


def set_token_grid(
    model: nn.Module, hw: tuple[int, int] | Sequence[tuple[int, int]] | None, num_prefix_tokens: int | None = None
) -> None:
    """Fix the token layout the tuned ViT blocks of ``model`` assume, until called with ``hw=None``.

    For encoders that lay tokens out themselves, e.g. packing images of different sizes into one
    sequence (vision-language encoders): ``hw`` is a list of per-image grids, the tokens (1, N, C)
    hold each image's ``num_prefix_tokens`` and patch tokens in turn, and Mona filters each image on
    its own grid (the attention must keep images apart, e.g. with a block-diagonal ``attn_mask``).
    ``hw=None`` hands the layout back to the patch embedding's hook.

    Example:
        >>> monatune.set_token_grid(vit, [(14, 14), (10, 20)], num_prefix_tokens=1)
        >>> for block in vit.blocks:
        ...     tokens = block(tokens, attn_mask=block_diagonal)
        >>> monatune.set_token_grid(vit, None)
    """
    grids = [m.__dict__["_monatune_grid"] for m in model.modules() if "_monatune_grid" in m.__dict__]
    if not grids:
        raise ValueError("the model has no tuned ViT blocks; apply a method that puts adapters in them first")
    for grid in grids:
        grid.pinned = hw is not None
        if hw is not None:
            grid.hw = [tuple(g) for g in hw] if isinstance(hw[0], (tuple, list)) else tuple(hw)
            if num_prefix_tokens is not None:
                grid.num_prefix_tokens = int(num_prefix_tokens)


def detach_token_grid(model: nn.Module) -> None:
    """Undo :func:`attach_token_grid`."""
    for owner in list(model.modules()):
        if not _is_vit(owner):  # other families keep their grids on their own towers
            continue
        grid = owner.__dict__.pop("_monatune_grid", None)
        if grid is None:
            continue
        hooks = owner.patch_embed._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if hook is grid]:
            del hooks[key]
        for module in owner.modules():
            module.__dict__.pop("token_grid", None)


class _TokenBlockMixin(TunedBlockMixin):
    token_grid: TokenGrid

    def _adapt_tokens(self, slot: str, x: Tensor) -> Tensor:
        g = self.token_grid
        return self._adapt(slot, x, hw=g.hw, num_prefix_tokens=g.num_prefix_tokens)

    def _mlp_half(self, x: Tensor, branch: Tensor) -> Tensor:
        """``x + DropPath(mlp_out(branch)) + mlp_parallel(x)``, then ``after_mlp``."""
        x = self._mlp_residual(x, branch, self.drop_path2)
        return self._adapt_tokens("after_mlp", x)


class TunedViTBlock(Block, _TokenBlockMixin):
    """timm ``vision_transformer.Block`` with adapter slots."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        prompt = self._slot("prompt")
        if prompt is not None:
            if attn_mask is not None:
                raise ValueError("VPT prompts cannot be combined with an attention mask")
            P = self.token_grid.num_prefix_tokens
            x = torch.cat([x[:, :P], prompt.enter(x.shape[0], x), x[:, P:]], dim=1)
        y = self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
        x = x + self._branch("attn_out", y, self.drop_path1)
        x = self._adapt_tokens("after_attn", x)
        x = self._mlp_half(x, self.ls2(self.mlp(self.norm2(x))))
        if prompt is not None:
            n = prompt.num_tokens
            prompt.leave(x[:, P : P + n])
            x = torch.cat([x[:, :P], x[:, P + n :]], dim=1)
        return x


class TunedEvaBlock(EvaBlock, _TokenBlockMixin):
    """timm ``eva.EvaBlock`` with adapter slots (no ``prompt`` slot: rotary embeddings fix the token layout)."""

    def forward(
        self,
        x: Tensor,
        rope: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        y = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self._branch("attn_out", y if self.gamma_1 is None else self.gamma_1 * y, self.drop_path1)
        x = self._adapt_tokens("after_attn", x)
        y = self.mlp(self.norm2(x))
        return self._mlp_half(x, y if self.gamma_2 is None else self.gamma_2 * y)


class _DenseTokens(DenseMixin):
    hierarchical = False
    map_blocks = False  # blocks on (B, H, W, C) maps (SAM ViT): timm returns them as NCHW maps only

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        x = self._pad_to_patch(x)
        if self.map_blocks:
            feats = self.forward_intermediates(  # type: ignore[attr-defined]
                x, indices=self.out_indices, norm=False, output_fmt="NCHW", intermediates_only=True
            )
            return OrderedDict((str(i), self._output(i, f.permute(0, 2, 3, 1))) for i, f in enumerate(feats))
        patch = self.patch_embed.patch_size  # type: ignore[attr-defined]
        grid = (x.shape[-2] // patch[0], x.shape[-1] // patch[1])  # not timm's math.ceil, which fixes a traced size
        feats = self.forward_intermediates(  # type: ignore[attr-defined]
            x, indices=self.out_indices, norm=False, output_fmt="NLC", intermediates_only=True
        )
        return OrderedDict((str(i), self._output(i, f.unflatten(1, grid))) for i, f in enumerate(feats))


class DenseViT(VisionTransformer, _DenseTokens):
    """A timm VisionTransformer returning chosen block outputs as maps (class swapped in)."""

    forward = _DenseTokens.forward


class DenseEva(Eva, _DenseTokens):
    """A timm Eva returning chosen block outputs as maps (class swapped in)."""

    forward = _DenseTokens.forward


def build_dense_vit(name: str, out_indices: Sequence[int] | None, kwargs: dict[str, Any]) -> nn.Module:
    model = create_timm_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, dynamic_img_pad=True,
                              **kwargs)  # fmt: skip
    dense_cls = {VisionTransformer: DenseViT, Eva: DenseEva}.get(type(model))
    if dense_cls is None:
        raise ValueError(f"{name!r} builds a timm {type(model).__name__}, not a VisionTransformer or Eva")
    swap_class(model, dense_cls)
    model.norm = nn.Identity()
    model._describe_blocks(out_indices)
    return model


_VIT_LINEARS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
register_block(BlockRule(
    block=Block, tuned=TunedViTBlock, family="timm ViT / DeiT / DINOv2 / CLIP",
    slots=("prompt", "attn_out", "after_attn", "mlp_parallel", "mlp_out", "after_mlp"),
    grid="tokens: prefix + patch grid (B, N, C)", linears=_VIT_LINEARS,
    attach=attach_token_grid, detach=detach_token_grid, check=check_token_grid,
))
register_block(BlockRule(
    block=EvaBlock, tuned=TunedEvaBlock, family="timm EVA (incl. DINOv3)",
    slots=("attn_out", "after_attn", "mlp_parallel", "mlp_out", "after_mlp"),
    grid="tokens: prefix + patch grid (B, N, C)",
    linears={**_VIT_LINEARS, "q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj"},  # fused or not
    attach=attach_token_grid, detach=detach_token_grid, check=check_token_grid,
))
register_dense(DenseRule(family="timm ViT/DeiT/DINOv2 (vit_*, deit_*), timm EVA (eva*)",
                         timm_modules=("vision_transformer", "deit", "eva"), build=build_dense_vit, hierarchical=False))
