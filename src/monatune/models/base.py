"""What every tuned block shares: named adapter slots, one active adapter.

A tuned block is the timm block itself with its class swapped for a subclass whose forward
calls the adapter slots (so the block keeps its parameters and state-dict keys). Each slot
is an ``nn.ModuleDict`` child keyed by adapter name, created when an adapter is added::

    layers.0.blocks.1.after_attn.default.project1.weight
    \\_ block ______/ \\_ slot _/ \\_ name/ \\_ adapter tensor

so one frozen backbone can carry several named adapters; the active one runs.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["TunedBlockMixin", "SLOTS"]

#: Slot names, in the order they run in a block.
SLOTS = ("after_attn", "after_mlp")


class TunedBlockMixin:
    """Mixin for swapped-in block classes. Never instantiated on its own."""

    active_adapter: str | None = None

    def _adapt(self, slot: str, x: Tensor, **kwargs: Any) -> Tensor:
        adapters = self._modules.get(slot)  # type: ignore[attr-defined]
        if adapters is None or self.active_adapter not in adapters:
            return x
        return adapters[self.active_adapter](x, **kwargs)


def swap_class(module: nn.Module, tuned_cls: type) -> None:
    """Turn ``module`` into an instance of ``tuned_cls`` (a subclass of its class)."""
    assert issubclass(tuned_cls, type(module)), (tuned_cls, type(module))
    module.__class__ = tuned_cls
