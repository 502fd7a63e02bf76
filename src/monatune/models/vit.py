"""Where Mona goes in timm ViT-family blocks (ViT, DeiT, DINOv2, EVA).

As in Swin, one adapter after each residual add::

    x = x + DropPath(LayerScale(Attention(LN1(x))))
    x = Mona_1(x)                                   # slot "after_attn"
    x = x + DropPath(LayerScale(MLP(LN2(x))))
    x = Mona_2(x)                                   # slot "after_mlp"

The stream is (B, N, C) with the prefix tokens (class, distillation and register tokens)
first and the patch tokens after them. Mona lays the patch tokens out on their grid for
its convolutions and treats each prefix token as an isolated 1x1 map (only the kernels'
centre taps act on it). The grid follows the input: a forward pre-hook on the model's
patch embedding records it on every call, so dynamic image sizes work.
"""
from __future__ import annotations

from typing import Any

from timm.models.eva import EvaBlock
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .base import TunedBlockMixin

__all__ = ["TokenGrid", "TunedViTBlock", "TunedEvaBlock", "attach_token_grid", "detach_token_grid"]


class TokenGrid:
    """The patch grid of the current forward, shared by all blocks of one model."""

    def __init__(self, num_prefix_tokens: int, hw: tuple[int, int]) -> None:
        self.num_prefix_tokens = num_prefix_tokens
        self.hw = hw

    def __call__(self, patch_embed: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook on the patch embedding: read the grid off the image size."""
        image = args[0]
        size = (image.shape[-2], image.shape[-1])
        feat = getattr(patch_embed, "dynamic_feat_size", None)
        self.hw = tuple(feat(size)) if feat is not None else tuple(patch_embed.grid_size)


def attach_token_grid(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Give ``blocks`` (and the model) a shared :class:`TokenGrid` kept current by a hook."""
    grid = getattr(model, "_monatune_grid", None)
    if grid is None:
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is None or not hasattr(model, "num_prefix_tokens"):
            raise ValueError(
                f"{type(model).__name__} has ViT blocks but no `patch_embed`/`num_prefix_tokens`; pass the "
                "whole timm VisionTransformer / Eva model (or a monatune DenseBackbone) to monatune.apply"
            )
        grid = TokenGrid(int(model.num_prefix_tokens), tuple(patch_embed.grid_size))
        model._monatune_grid = grid
        patch_embed.register_forward_pre_hook(grid)
    for block in blocks:
        block.token_grid = grid


def detach_token_grid(model: nn.Module) -> None:
    """Undo :func:`attach_token_grid`."""
    grid = model.__dict__.pop("_monatune_grid", None)
    if grid is None:
        return
    hooks = model.patch_embed._forward_pre_hooks
    for key in [k for k, hook in hooks.items() if hook is grid]:
        del hooks[key]
    for module in model.modules():
        module.__dict__.pop("token_grid", None)


class _TokenBlockMixin(TunedBlockMixin):
    token_grid: TokenGrid

    def _adapt_tokens(self, slot: str, x: Tensor) -> Tensor:
        g = self.token_grid
        return self._adapt(slot, x, hw=g.hw, num_prefix_tokens=g.num_prefix_tokens)


class TunedViTBlock(Block, _TokenBlockMixin):
    """timm ``vision_transformer.Block`` with adapter slots."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = self._adapt_tokens("after_attn", x)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        x = self._adapt_tokens("after_mlp", x)
        return x


class TunedEvaBlock(EvaBlock, _TokenBlockMixin):
    """timm ``eva.EvaBlock`` with adapter slots."""

    def forward(
        self,
        x: Tensor,
        rope: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        y = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(y if self.gamma_1 is None else self.gamma_1 * y)
        x = self._adapt_tokens("after_attn", x)
        y = self.mlp(self.norm2(x))
        x = x + self.drop_path2(y if self.gamma_2 is None else self.gamma_2 * y)
        x = self._adapt_tokens("after_mlp", x)
        return x
