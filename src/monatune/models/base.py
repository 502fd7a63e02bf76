"""What every tuned module shares: named adapter slots, one active adapter.

A tuned module is the timm module itself with its class swapped for a subclass whose
forward calls the adapter slots (so it keeps its parameters and state-dict keys). Each slot
is an ``nn.ModuleDict`` child keyed by adapter name, created when an adapter is added::

    layers.0.blocks.1.after_attn.default.project1.weight
    \\_ block ______/ \\_ slot _/ \\_ name/ \\_ adapter tensor

so one frozen backbone can carry several named adapters; the active one runs.

Blocks have the slots below, in the order they run; the leaf modules of a block (linears,
LayerNorms, the patch embedding's convolution) have ``lora`` and ``ssf``::

    prompt        VPT tokens that join the block's attention
    attn_out      on the attention branch, before DropPath     (Houlsby adapter, LoRand; after
                  DropPath for an adapter built with ``drop_path="outside"``, STAR-MMRotate's)
    after_attn    on the stream after the first residual add   (Mona)
    mlp_parallel  a branch beside the MLP, fed the stream       (AdaptFormer)
    mlp_out       on the MLP branch, before DropPath           (Houlsby adapter, LoRand)
    after_mlp     on the stream after the second residual add  (Mona)
    after_block   on the stream after a block's only residual add (Mona on convolutional blocks)

Which of them a block class has is its rule's (:mod:`monatune.models.registry`).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["TunedBlockMixin", "SLOTS", "BLOCK_SLOTS", "LEAF_SLOTS", "swap_class"]

BLOCK_SLOTS = ("prompt", "attn_out", "after_attn", "mlp_parallel", "mlp_out", "after_mlp", "after_block")
LEAF_SLOTS = ("lora", "ssf")
SLOTS = BLOCK_SLOTS + LEAF_SLOTS


class TunedBlockMixin:
    """Mixin for swapped-in classes. Never instantiated on its own."""

    active_adapter: str | None = None

    def _slot(self, slot: str) -> nn.Module | None:
        """The active adapter in ``slot``, or None."""
        adapters = self._modules.get(slot)  # type: ignore[attr-defined]
        if adapters is None or self.active_adapter is None:
            return None
        return adapters._modules.get(self.active_adapter)

    def _adapt(self, slot: str, x: Tensor, **kwargs: Any) -> Tensor:
        adapter = self._slot(slot)
        return x if adapter is None else adapter(x, **kwargs)

    def _branch(self, slot: str, y: Tensor, drop_path: nn.Module | None) -> Tensor:
        """A residual branch ``y`` through its DropPath and the adapter in ``slot``: ``drop_path(adapter(y))``,
        or ``adapter(drop_path(y))`` for an adapter whose ``after_drop_path`` is set (None: no DropPath)."""
        adapter = self._slot(slot)
        if drop_path is None:
            return y if adapter is None else adapter(y)
        if adapter is None:
            return drop_path(y)
        return adapter(drop_path(y)) if getattr(adapter, "after_drop_path", False) else drop_path(adapter(y))

    def _mlp_residual(self, x: Tensor, branch: Tensor, drop_path: nn.Module | None) -> Tensor:
        """The MLP's residual add with its slots: ``x + DropPath(mlp_out(branch)) + mlp_parallel(x)``."""
        parallel = self._slot("mlp_parallel")
        y = self._branch("mlp_out", branch, drop_path)
        return x + y if parallel is None else x + y + parallel(x)


def swap_class(module: nn.Module, tuned_cls: type) -> None:
    """Turn ``module`` into an instance of ``tuned_cls`` (a subclass of its class)."""
    assert issubclass(tuned_cls, type(module)), (tuned_cls, type(module))
    module.__class__ = tuned_cls
