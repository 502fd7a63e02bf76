"""Where the methods go in open_clip's image tower (``open_clip.transformer.VisionTransformer``).

The tower's blocks are ``ResidualAttentionBlock``s (pre-norm, ``nn.MultiheadAttention``, optional
LayerScale ``ls_1``/``ls_2``, no DropPath). The block's forward, with every slot (see
:mod:`monatune.models.base` for which method fills which slot)::

    x = [class, prompts, patches]                    # slot "prompt" (VPT)
    x = x + attn_out(LayerScale(MultiheadAttention(LN1(x))))
    x = after_attn(x)                                # Mona_1
    x = x + mlp_out(LayerScale(MLP(LN2(x)))) + mlp_parallel(x)
    x = after_mlp(x)                                 # Mona_2
    x = [class, patches]

The stream is (B, 1 + H*W, C) (``batch_first``, open_clip's default) or (1 + H*W, B, C) (a
``Transformer`` built with ``batch_first=False``); the block reads which from its attention. Mona
sees the patch tokens on their grid, the class token as an isolated 1x1 map; the grid is read off
the input of the tower's ``conv1`` by a forward pre-hook, so a tower whose positional embedding was
resized for another image size tunes too. Patch dropout (``patch_dropout > 0``, training only)
removes tokens from the grid: Mona then raises.

Only the image tower. The text tower's blocks are the same class, and a text sequence has no grid;
tune the image tower alone::

    monatune.apply(clip.visual, "mona")

(passing the whole CLIP model to a method that fills block slots raises a ``ValueError`` saying so).

LoRA reaches the MLP's ``c_fc`` and ``c_proj`` (``modules=["fc1", "fc2"]``). The attention is an
``nn.MultiheadAttention``: its q, k, v projection is a raw ``in_proj_weight`` and its forward reads
``out_proj.weight`` directly (``F.multi_head_attention_forward``) without calling ``out_proj``, so an
adapter on either would never run; LoRA's default ``q``/``v`` raise a ``ValueError`` listing
``fc1``, ``fc2``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from .base import TunedBlockMixin
from .registry import BlockRule, register_block
from .vit import TokenGrid

__all__ = ["ConvGrid", "TunedResidualAttentionBlock", "attach_visual_grid", "detach_visual_grid"]



class ConvGrid(TokenGrid):
    """The token grid of an open_clip image tower, read off the input of its patch convolution ``conv1``."""

    def __call__(self, conv: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook on ``conv1``."""
        if self.pinned:
            return
        size = args[0].shape[-2:]
        self.hw = tuple(
            (s + 2 * p - k) // st + 1 for s, k, st, p in zip(size, conv.kernel_size, conv.stride, conv.padding)
        )


def _towers(model: nn.Module) -> list[tuple[nn.Module, set[int]]]:
    return [(m, {id(x) for x in m.modules()}) for m in model.modules() if isinstance(m, VisionTransformer)]


def check_image_tower(model: nn.Module, blocks: Sequence[nn.Module]) -> None:
    """Refuse blocks outside an image tower (a CLIP text tower's), before any method changes the model."""
    members = _towers(model)
    outside = {id(b) for b in blocks if not any(id(b) in ids for _, ids in members)}
    if outside:
        raise ValueError(
            f"{type(model).__name__} has {len(outside)} open_clip ResidualAttentionBlock(s) outside an image tower "
            "(open_clip.transformer.VisionTransformer), e.g. a CLIP text tower's; monatune tunes the image tower: "
            "pass it alone, monatune.apply(clip.visual, ...)"
        )


def attach_visual_grid(model: nn.Module, blocks: Sequence[nn.Module]) -> None:
    """Give ``blocks`` the :class:`ConvGrid` of the image tower around them, kept current by a hook on its
    ``conv1``; blocks outside an image tower (the text tower's) are refused."""
    check_image_tower(model, blocks)
    members = _towers(model)
    for block in blocks:
        tower = next(tower for tower, ids in members if id(block) in ids)
        grid = tower.__dict__.get("_monatune_grid")
        if grid is None:
            grid = ConvGrid(1, tuple(tower.grid_size))  # the class token first
            tower._monatune_grid = grid  # where monatune.set_token_grid finds it
            tower.conv1.register_forward_pre_hook(grid)
        block.token_grid = grid


def detach_visual_grid(model: nn.Module) -> None:
    """Undo :func:`attach_visual_grid` for every tower no tuned block uses any more."""
    for tower in [m for m in model.modules() if isinstance(m, VisionTransformer)]:
        grid = tower.__dict__.get("_monatune_grid")
        if grid is None:
            continue
        if any(isinstance(m, TunedBlockMixin) and m.__dict__.get("token_grid") is grid for m in tower.modules()):
            continue
        del tower.__dict__["_monatune_grid"]
        hooks = tower.conv1._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if hook is grid]:
            del hooks[key]
        for module in tower.modules():
            if module.__dict__.get("token_grid") is grid:
                del module.__dict__["token_grid"]


class TunedResidualAttentionBlock(ResidualAttentionBlock, TunedBlockMixin):
    """open_clip ``ResidualAttentionBlock`` of an image tower with adapter slots (class swapped in, never built)."""

    token_grid: ConvGrid

    def forward(
        self,
        q_x: Tensor,
        k_x: Tensor | None = None,
        v_x: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        k_x = self.ln_1_kv(k_x) if hasattr(self, "ln_1_kv") and k_x is not None else None
        v_x = self.ln_1_kv(v_x) if hasattr(self, "ln_1_kv") and v_x is not None else None
        prompt = self._slot("prompt")
        x = q_x
        if prompt is not None:
            if attn_mask is not None or k_x is not None:
                raise ValueError("VPT prompts join self-attention without a mask; this block got an attn_mask or k_x")
            x = self._insert(x, prompt.enter(x.shape[self._batch_dim], x))
        x = x + self._branch("attn_out", self.ls_1(self.attention(q_x=self.ln_1(x), k_x=k_x, v_x=v_x,
                                                                  attn_mask=attn_mask)), None)  # fmt: skip
        x = self._adapt_tokens("after_attn", x)
        x = self._mlp_residual(x, self.ls_2(self.mlp(self.ln_2(x))), None)
        x = self._adapt_tokens("after_mlp", x)
        if prompt is not None:
            x, prompts = self._remove(x, prompt.num_tokens)
            prompt.leave(prompts)
        return x

    @property
    def _batch_dim(self) -> int:
        return 0 if self.attn.batch_first else 1

    def _adapt_tokens(self, slot: str, x: Tensor) -> Tensor:
        adapter = self._slot(slot)
        if adapter is None:
            return x
        g = self.token_grid
        if self.attn.batch_first:
            return adapter(x, hw=g.hw, num_prefix_tokens=g.num_prefix_tokens)
        return adapter(x.transpose(0, 1), hw=g.hw, num_prefix_tokens=g.num_prefix_tokens).transpose(0, 1)

    def _insert(self, x: Tensor, prompts: Tensor) -> Tensor:
        """``x`` with ``prompts`` (B, n, C) after the class token."""
        if not self.attn.batch_first:
            prompts = prompts.transpose(0, 1)
        d = 1 - self._batch_dim  # the token dim
        P = self.token_grid.num_prefix_tokens
        return torch.cat([x.narrow(d, 0, P), prompts, x.narrow(d, P, x.shape[d] - P)], dim=d)

    def _remove(self, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """``x`` without the ``n`` prompt tokens after the class token, and those tokens as (B, n, C)."""
        d = 1 - self._batch_dim
        P = self.token_grid.num_prefix_tokens
        prompts = x.narrow(d, P, n)
        x = torch.cat([x.narrow(d, 0, P), x.narrow(d, P + n, x.shape[d] - P - n)], dim=d)
        return x, prompts if self.attn.batch_first else prompts.transpose(0, 1)


register_block(BlockRule(
    block=ResidualAttentionBlock, tuned=TunedResidualAttentionBlock, family="open_clip image tower",
    slots=("prompt", "attn_out", "after_attn", "mlp_parallel", "mlp_out", "after_mlp"),
    grid="tokens: class token + patch grid, (B, 1 + H*W, C) or (1 + H*W, B, C)",
    width=lambda b: b.ln_1.normalized_shape[0], linears={"fc1": "mlp.c_fc", "fc2": "mlp.c_proj"},
    attach=attach_visual_grid, detach=detach_visual_grid, check=check_image_tower,
))
