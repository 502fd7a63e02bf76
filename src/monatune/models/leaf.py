"""Linears, LayerNorms and convolutions with ``lora`` / ``ssf`` slots (class swapped in).

The tuned class computes the module's own output and hands input and output to the active
adapter of each slot, ``y = adapter(x, y)``, unless that adapter is merged into the weights.
"""
from __future__ import annotations

from timm.layers import LayerNorm as TimmLayerNorm
from torch import Tensor, nn

from .base import LEAF_SLOTS, TunedBlockMixin

__all__ = ["TunedLinear", "TunedLayerNorm", "TunedTimmLayerNorm", "TunedConv2d", "LEAF_RULES"]


class _LeafMixin(TunedBlockMixin):
    def _tune(self, x: Tensor, y: Tensor) -> Tensor:
        for slot in LEAF_SLOTS:
            adapter = self._slot(slot)
            if adapter is not None and not adapter.merged:
                y = adapter(x, y)
        return y


class TunedLinear(nn.Linear, _LeafMixin):
    def forward(self, x: Tensor) -> Tensor:
        return self._tune(x, super().forward(x))


class TunedLayerNorm(nn.LayerNorm, _LeafMixin):
    def forward(self, x: Tensor) -> Tensor:
        return self._tune(x, super().forward(x))


class TunedTimmLayerNorm(TimmLayerNorm, _LeafMixin):
    def forward(self, x: Tensor) -> Tensor:
        return self._tune(x, super().forward(x))


class TunedConv2d(nn.Conv2d, _LeafMixin):
    def forward(self, x: Tensor) -> Tensor:
        return self._tune(x, super().forward(x))


#: Exact module type -> tuned subclass.
LEAF_RULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: TunedLinear,
    nn.LayerNorm: TunedLayerNorm,
    TimmLayerNorm: TunedTimmLayerNorm,
    nn.Conv2d: TunedConv2d,
}
