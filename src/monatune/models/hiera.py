"""Where the methods go in a timm Hiera block (``timm.models.hiera``, ``hiera_*``), with Mona on the true grid.

Hiera (Ryali et al., "Hiera: A Hierarchical Vision Transformer without the Bells-and-Whistles",
ICML 2023) keeps its tokens as (B, N, C) in *unrolled* order (timm's ``Unroll``): the patch grid
is split by the q-stride once per pooling stage, so that the first block of a stage pools with
``x.view(B, q_stride, -1, C).amax(1)`` and mask units are contiguous. Neighbouring tokens in that
order are not neighbours in the image. The block's forward, with every slot (see
:mod:`monatune.models.base` for which method fills which slot)::

    s = x, or maxpool(proj(LN1(x)))                     # a stage's first block: dim -> dim_out, q-pooled
    x = s + DropPath(attn_out(LayerScale(MaskUnitAttention(LN1(x)))))
    x = after_attn(x)                                   # Mona_1, on the block's H x W grid
    x = x + DropPath(mlp_out(LayerScale(MLP(LN2(x))))) + mlp_parallel(x)
    x = after_mlp(x)                                    # Mona_2, on the block's H x W grid

The adapters at ``attn_out``, ``mlp_out`` and ``mlp_parallel`` act on each token alone, so the
order does not matter to them. Mona's depthwise convolutions need the true grid: at its slots the
tokens are rerolled to the (B, H, W, C) map of the block's output (timm's ``Reroll`` schedule for
that block index), Mona runs on the map, and the tokens go back to the block's order by the
inverse permutation. Both directions are one gather with an index computed by running timm's own
``Reroll`` on token numbers, cached per token grid and device (:class:`HieraLayout`). The token
grid follows the input: a forward pre-hook on the patch embedding records it on every call.
There is no ``prompt`` slot: the mask units fix the token layout (no VPT). Inputs with masked
mask units (``mask=``, ``patch_drop_rate``) have no full grid and are refused at a Mona slot.

The dense backbone (:class:`DenseHiera`) returns the stage ends' outputs as maps through output
norms ``norm{i}`` (strides 4, 8, 16, 32 for the timm variants), for any input size: the image is
zero-padded on the right/bottom to a multiple of the size the unrolling and mask units need (32
for the timm variants), the absolute position embedding is resampled to that grid (or, for
``*_abswin_*`` models, the window embedding tiled and the global one interpolated, as timm does
at its native size), and each map is cropped to ``ceil(size / stride)``.

timm's port of SAM 2's image encoder (``timm.models.hieradet_sam2``, ``sam2_hiera_*``,
``hieradet_small``) is a Hiera whose blocks keep the stream as a channels-last (B, H, W, C) map
with windowed attention, so no reroll is needed: :class:`TunedHieraDetBlock` has the same slots
(as :mod:`monatune.models.sam2_hiera` for the ``sam2`` package), and :class:`DenseHieraDet`
returns its stage maps for any input size (padded to a multiple of 32 for the timm variants, so
that the window position embedding tiles and every pooling halves the map exactly, then cropped).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models._manipulate import checkpoint
from timm.models.hiera import Hiera, HieraBlock, Reroll
from timm.models.hieradet_sam2 import HieraDet
from timm.models.hieradet_sam2 import MultiScaleBlock as HieraDetBlock
from torch import Tensor, nn

from .base import TunedBlockMixin, swap_class
from .dense import DenseMixin, ceil_div, create_timm_model, crop, window_partition, window_unpartition
from .registry import BlockRule, DenseRule, register_block, register_dense

__all__ = ["HieraLayout", "TunedHieraBlock", "DenseHiera", "attach_hiera_layout", "detach_hiera_layout",
           "build_dense_hiera", "TunedHieraDetBlock", "DenseHieraDet", "build_dense_hieradet"]


def _conv_out(size: Sequence[int], conv: nn.Conv2d) -> tuple[int, ...]:
    """Output size of ``conv`` for an input of spatial ``size``."""
    return tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(size, conv.padding, conv.dilation, conv.kernel_size, conv.stride)
    )


class HieraLayout:
    """Where each token of a timm Hiera sits on the grid, for the current input size.

    Shared by the tuned blocks of one model. Called as a forward pre-hook on the patch embedding,
    it records the token grid of the image; :meth:`to_grid` / :meth:`to_tokens` move a block's
    output between Hiera's unrolled order and its (B, H, W, C) map.
    """

    def __init__(self, model: Hiera) -> None:
        self.schedule = [tuple(s) for s in model.unroll.schedule]
        self.stage_ends = list(model.stage_ends)
        self.q_pool = int(model.q_pool)
        self.grid: tuple[int, ...] = tuple(model.tokens_spatial_shape)
        self._cache: dict[tuple[Any, ...], tuple[tuple[int, ...], Tensor | None, Tensor | None]] = {}

    def __call__(self, patch_embed: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook on the patch embedding: read the token grid off the image size."""
        self.grid = _conv_out(args[0].shape[2:], patch_embed.proj)

    def _order(self, block_index: int, device: torch.device) -> tuple[tuple[int, ...], Tensor | None, Tensor | None]:
        """Block ``block_index``'s output grid size, the token at each grid position (row-major), and the
        inverse permutation; None for both when the order already is the grid's (the last stage)."""
        if torch.compiler.is_compiling():  # built in the graph: a dict keyed by symbolic sizes would specialise them
            return self._build_order(block_index, device)
        key = (self.grid, block_index, device)
        if key not in self._cache:
            if len(self._cache) >= 256:  # a few input sizes' worth of blocks
                self._cache.clear()
            self._cache[key] = self._build_order(block_index, device)
        return self._cache[key]

    def _build_order(
        self, block_index: int, device: torch.device
    ) -> tuple[tuple[int, ...], Tensor | None, Tensor | None]:
        reroll = Reroll(self.grid, (1,) * len(self.grid), self.schedule, self.stage_ends, self.q_pool)
        schedule, size = reroll.schedule[block_index]
        order = inverse = None
        if schedule:
            n = math.prod(size)
            order = reroll(torch.arange(n, device=device).view(1, n, 1), block_index).flatten()
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(n, device=device)
        return tuple(size), order, inverse

    def size(self, block_index: int) -> tuple[int, ...]:
        """The grid of block ``block_index``'s output."""
        return tuple(Reroll(self.grid, (1,) * len(self.grid), self.schedule, self.stage_ends,
                            self.q_pool).schedule[block_index][1])  # fmt: skip

    def to_grid(self, x: Tensor, block_index: int) -> Tensor:
        """Block ``block_index``'s output tokens (B, N, C) as its map (B, H, W, C)."""
        size, order, _ = self._order(block_index, x.device)
        B, N, C = x.shape
        if N != math.prod(size):
            raise ValueError(
                f"timm Hiera block {block_index} gave {N} tokens, not the {'x'.join(map(str, size))} grid of a "
                f"{'x'.join(map(str, self.grid))} token input; masked inputs (`mask=`, `patch_drop_rate`) drop mask "
                "units, and Mona needs every token on its grid"
            )
        return (x if order is None else x.index_select(1, order)).reshape(B, *size, C)

    def to_tokens(self, x: Tensor, block_index: int) -> Tensor:
        """The inverse of :meth:`to_grid`: a map (B, H, W, C) back in the block's token order (B, N, C)."""
        _, _, inverse = self._order(block_index, x.device)
        x = x.flatten(1, -2)
        return x if inverse is None else x.index_select(1, inverse)

    def unroll(self, x: Tensor) -> Tensor:
        """Patch tokens (B, N, C) in row-major grid order into Hiera's unrolled order (timm's ``Unroll``)."""
        _, _, inverse = self._order(0, x.device)  # block 0 never pools: its order is the unrolled input's
        return x if inverse is None else x.index_select(1, inverse)


def attach_hiera_layout(model: nn.Module, blocks: Sequence[nn.Module]) -> None:
    """Give each tuned Hiera block its index and the :class:`HieraLayout` of its model (installed once per model)."""
    pending = {id(b) for b in blocks}
    for hiera in (m for m in model.modules() if isinstance(m, Hiera)):
        tuned = [(i, block) for i, block in enumerate(hiera.blocks) if id(block) in pending]
        for i, block in tuned:
            block.hiera_layout, block.hiera_index = hiera_layout(hiera), i
            pending.discard(id(block))
    if pending:
        raise ValueError(
            "timm Hiera blocks were tuned outside a timm Hiera model; Mona needs the model's token order, so pass the "
            "whole Hiera (or a monatune DenseBackbone, or a module containing it) to monatune.apply"
        )


def hiera_layout(hiera: Hiera) -> HieraLayout:
    """The :class:`HieraLayout` of ``hiera``, created with its pre-hook on first use."""
    layout = hiera.__dict__.get("hiera_layout")
    if layout is None:
        layout = HieraLayout(hiera)
        hiera.hiera_layout = layout
        hiera.patch_embed.register_forward_pre_hook(layout)
    return layout


def detach_hiera_layout(model: nn.Module) -> None:
    """Undo :func:`attach_hiera_layout` (a dense Hiera keeps its layout: its forward needs it)."""
    for hiera in (m for m in model.modules() if isinstance(m, Hiera)):
        for block in hiera.blocks:
            block.__dict__.pop("hiera_layout", None)
            block.__dict__.pop("hiera_index", None)
        if isinstance(hiera, DenseHiera):
            continue
        layout = hiera.__dict__.pop("hiera_layout", None)
        hooks = hiera.patch_embed._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if hook is layout]:
            del hooks[key]


class TunedHieraBlock(HieraBlock, TunedBlockMixin):
    """A timm ``HieraBlock`` with adapter slots (class swapped in, never built)."""

    hiera_layout: HieraLayout
    hiera_index: int

    def forward(self, x: Tensor) -> Tensor:  # B, N, C (unrolled)
        x_norm = self.norm1(x)
        if self.do_expand:  # a stage's first block: project and max-pool the shortcut (timm's code)
            if self.proj is not None:
                x = self.proj(x_norm)
                x = x.view(x.shape[0], self.attn.q_stride, -1, x.shape[-1]).amax(dim=1)
            else:
                x = torch.cat([
                    x.view(x.shape[0], self.attn.q_stride, -1, x.shape[-1]).amax(dim=1),
                    x.view(x.shape[0], self.attn.q_stride, -1, x.shape[-1]).mean(dim=1),
                ], dim=-1)  # fmt: skip
        x = x + self._branch("attn_out", self.ls1(self.attn(x_norm)), self.drop_path1)
        x = self._adapt_on_grid("after_attn", x)
        x = self._mlp_residual(x, self.ls2(self.mlp(self.norm2(x))), self.drop_path2)
        return self._adapt_on_grid("after_mlp", x)

    def _adapt_on_grid(self, slot: str, x: Tensor) -> Tensor:
        """The adapter in ``slot`` on the block's output map: reroll, adapt, unroll."""
        adapter = self._slot(slot)
        if adapter is None:
            return x
        layout, i = self.hiera_layout, self.hiera_index
        return layout.to_tokens(adapter(layout.to_grid(x, i)), i)


class DenseHiera(Hiera, DenseMixin):
    """A timm Hiera returning its stage maps for any input size (class swapped in).

    ``out_indices`` are the stages returned (keys ``"i"``), each through its output norm ``norm{i}``;
    ``out_channels`` and ``strides`` describe every stage, returned or not. ``pad_to`` is the
    multiple of the input size the token order needs.
    """

    pad_to: tuple[int, int]
    hiera_layout: HieraLayout

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":  # type: ignore[override]
        H, W = x.shape[-2:]
        x = self.patch_embed(self._pad_to_patch(x, self.pad_to))  # B, N, C; the layout's hook reads the grid
        layout = self.hiera_layout
        x = layout.unroll(x + self._pos_embed_at(layout.grid))
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i, block in enumerate(self.blocks):
            x = checkpoint(block, x) if self.grad_checkpointing and self.training else block(x)
            if i in self.stage_ends and (stage := self.stage_ends.index(i)) in self.out_indices:
                s = self.strides[stage]
                m = crop(layout.to_grid(x, i), ceil_div(H, s), ceil_div(W, s))  # B, H_i, W_i, C_i
                out[str(stage)] = self._output(stage, m)
        return out

    def _pos_embed_at(self, grid: tuple[int, ...]) -> Tensor:
        """The position embedding (1, N, C) for a token grid, in row-major order (timm's ``_pos_embed`` at ``grid``)."""
        if self.pos_embed_win is not None:  # abswin: window embedding tiled, global one interpolated
            win = self.pos_embed_win.tile([g // m for g, m in zip(grid, self.mask_unit_size)])
            pos = F.interpolate(self.pos_embed, size=win.shape[-2:], mode="bicubic", antialias=True) + win
            return pos.flatten(2).transpose(1, 2)
        return resample_abs_pos_embed(self.pos_embed, list(grid), list(self.tokens_spatial_shape), num_prefix_tokens=0)


def build_dense_hiera(name: str, out_indices: Sequence[int] | None, kwargs: dict[str, Any]) -> DenseHiera:
    """Dense timm Hiera: every stage end's output as a map, through a norm per returned stage."""
    model = create_timm_model(name, pretrained=False, num_classes=0, **kwargs)
    if type(model) is not Hiera:
        raise ValueError(f"{name!r} builds a timm {type(model).__name__}, not a Hiera")
    if model.pos_embed is None or len(model.tokens_spatial_shape) != 2:
        raise ValueError(f"{name!r}: dense backbones are built for 2-d Hiera with one position embedding, not video "
                         "models (sep_pos_embed)")  # fmt: skip
    swap_class(model, DenseHiera)
    model.reset_classifier(0, reset_other=True)  # the classifier's norm is not part of the dense backbone
    layout = hiera_layout(model)
    stride = model.patch_stride
    strides = [stride[0] * model.tokens_spatial_shape[0] // layout.size(e)[0] for e in model.stage_ends]
    model._describe_stages([model.blocks[e].dim_out for e in model.stage_ends], strides, out_indices)
    # the token grid must split by every unroll stride and into whole mask units
    unit = [math.lcm(math.prod(s[d] for s in layout.schedule), model.mask_unit_size[d]) for d in range(2)]
    model.pad_to = (stride[0] * unit[0], stride[1] * unit[1])
    return model


class TunedHieraDetBlock(HieraDetBlock, TunedBlockMixin):
    """A timm ``hieradet_sam2.MultiScaleBlock`` with adapter slots (class swapped in, never built)."""

    def forward(self, x: Tensor) -> Tensor:  # B, H, W, C
        x = self._attn_branch(x)
        x = self._adapt("after_attn", x)
        x = self._mlp_residual(x, self.ls2(self.mlp(self.norm2(x))), self.drop_path2)
        return self._adapt("after_mlp", x)

    def _attn_branch(self, x: Tensor) -> Tensor:
        """``shortcut + DropPath(attn_out(LayerScale(attention)))``: timm's forward up to its first residual add."""
        shortcut = x  # B, H, W, C
        x = self.norm1(x)
        if self.dim != self.dim_out:  # project and pool the shortcut
            shortcut = self.proj(x)
            if self.pool is not None:
                shortcut = self.pool(shortcut.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if self.is_windowed:  # timm's padded windows, sized for torch.compile (see monatune.models.dense)
            x, grid = window_partition(x, tuple(self.window_size))
            # window attention, queries pooled at a stage change (the windows shrink with them)
            x = window_unpartition(self.attn(x), shortcut.shape[1:3], grid)
        else:
            x = self.attn(x)
        return shortcut + self._branch("attn_out", self.ls1(x), self.drop_path1)


class DenseHieraDet(HieraDet, DenseMixin):
    """A timm HieraDet (SAM 2's Hiera) returning its stage maps for any input size (class swapped in).

    ``out_indices``, ``out_channels``, ``strides`` and ``pad_to`` as for :class:`DenseHiera`.
    """

    pad_to: tuple[int, int]

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":  # type: ignore[override]
        H, W = x.shape[-2:]
        x = self._pos_embed(self.patch_embed(self._pad_to_patch(x, self.pad_to)))  # B, H/4, W/4, C
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i, block in enumerate(self.blocks):
            x = checkpoint(block, x) if self.grad_checkpointing and self.training else block(x)
            if i in self.stage_ends and (stage := self.stage_ends.index(i)) in self.out_indices:
                s = self.strides[stage]
                out[str(stage)] = self._output(stage, crop(x, ceil_div(H, s), ceil_div(W, s)))  # B, C_i, H_i, W_i
        return out


def build_dense_hieradet(name: str, out_indices: Sequence[int] | None, kwargs: dict[str, Any]) -> DenseHieraDet:
    """Dense timm HieraDet: every stage end's output as a map, through a norm per returned stage."""
    model = create_timm_model(name, pretrained=False, num_classes=0, **kwargs)
    if type(model) is not HieraDet:
        raise ValueError(f"{name!r} builds a timm {type(model).__name__}, not a HieraDet")
    swap_class(model, DenseHieraDet)
    model.reset_classifier(0, reset_other=True)  # the classifier's norm is not part of the dense backbone
    patch, q = model.patch_embed.proj.stride, model.q_stride
    pools = [sum(b <= e for b in model.q_pool_blocks) for e in model.stage_ends]
    model._describe_stages([model.blocks[e].dim_out for e in model.stage_ends], [patch[0] * q[0] ** n for n in pools],
                           out_indices)  # fmt: skip
    # the window position embedding tiles whole windows, and every pooling halves the map exactly
    unit = [math.lcm(q[d] ** len(model.q_pool_blocks), model.window_spec[0]) for d in range(2)]
    model.pad_to = (patch[0] * unit[0], patch[1] * unit[1])
    return model


register_block(BlockRule(
    block=HieraBlock, tuned=TunedHieraBlock, family="timm Hiera",
    slots=("attn_out", "after_attn", "mlp_parallel", "mlp_out", "after_mlp"),
    grid="tokens (B, N, C) in Hiera's unrolled order; Mona sees them rerolled to the block's H x W map",
    width=lambda block: block.dim_out,
    linears={"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
    attach=attach_hiera_layout, detach=detach_hiera_layout,
))
register_dense(DenseRule(family="timm Hiera (hiera_*)", timm_modules=("hiera",), build=build_dense_hiera,
                         hierarchical=True))
register_block(BlockRule(
    block=HieraDetBlock, tuned=TunedHieraDetBlock, family="timm SAM 2 Hiera (HieraDet)",
    slots=("attn_out", "after_attn", "mlp_parallel", "mlp_out", "after_mlp"), grid="NHWC map",
    width=lambda block: block.dim_out,
    linears={"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
))
register_dense(DenseRule(family="timm SAM 2 Hiera (sam2_hiera_*, hieradet_*)", timm_modules=("hieradet_sam2",),
                         build=build_dense_hieradet, hierarchical=True))
