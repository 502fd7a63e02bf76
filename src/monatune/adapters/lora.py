"""LoRA: low-rank updates of a linear layer's weight, here on slices of a fused projection.

From "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., ICLR 2022). The Mona
release applies it to the fused ``qkv`` projection of every Swin attention, on the query
and value slices only, rank 64, alpha 1 (``loralib.MergedLinear(dim, 3 * dim, r=64,
enable_lora=[True, False, True])``)::

    qkv(x) = W x + b + (alpha / r) * [B_q A_q x ; 0 ; B_v A_v x]

``lora_A`` stacks the A matrices of the enabled slices (rows), ``lora_B`` their B matrices,
in loralib's layout, so a release LoRA checkpoint maps tensor for tensor. A starts
Kaiming-uniform and B at zero, so an untrained LoRA changes nothing. Being linear in the
weight, it merges into it: ``W[slice] += (alpha / r) * B A``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .bottleneck import check_dropout, check_positive_int

__all__ = ["LoRA"]


class LoRA(nn.Module):
    """Low-rank update of some output slices of a linear layer; called as ``lora(x, y)``.

    Args:
        in_features: Input width of the host linear.
        out_features: Output width of the host linear.
        rank: Rank ``r`` of each update.
        alpha: Scale numerator; the update is multiplied by ``alpha / rank``.
        dropout: Dropout on the LoRA input.
        num_slices: The host output is this many equal slices (3 for a fused qkv).
        slices: Indices of the slices that get an update (``(0, 2)``: query and value).
    """

    merged: bool

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 64,
        alpha: float = 1.0,
        dropout: float = 0.0,
        num_slices: int = 1,
        slices: Sequence[int] = (0,),
    ) -> None:
        super().__init__()
        check_positive_int("rank", rank)
        check_dropout(dropout)
        if out_features % num_slices or not slices or any(not 0 <= s < num_slices for s in slices):
            raise ValueError(f"cannot take slices {tuple(slices)} of {num_slices} from {out_features} outputs")
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.num_slices, self.slice_size = num_slices, out_features // num_slices
        self.slices = tuple(int(s) for s in slices)
        self.register_buffer("slice_index", torch.tensor(self.slices), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(rank * len(self.slices), in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.slice_size * len(self.slices), rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    def delta_weight(self) -> Tensor:
        """The update of the enabled slices, (len(slices), slice_size, in_features), already scaled."""
        k, r = len(self.slices), self.rank
        a = self.lora_A.view(k, r, -1)
        b = self.lora_B.view(k, self.slice_size, r)
        return torch.bmm(b, a) * self.scaling

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Add the update to the host's output ``y`` for its input ``x``."""
        k = len(self.slices)
        z = (self.dropout(x) @ self.lora_A.t()).unflatten(-1, (k, self.rank))  # ..., k, r
        d = torch.einsum("...kr,ksr->...ks", z, self.lora_B.view(k, self.slice_size, self.rank)) * self.scaling
        if k == self.num_slices:
            return y + d.flatten(-2)
        return y.unflatten(-1, (self.num_slices, self.slice_size)).index_add(-2, self.slice_index, d).flatten(-2)

    @torch.no_grad()
    def merge_into(self, host: nn.Linear) -> None:
        weight = host.weight.view(self.num_slices, self.slice_size, -1)
        weight.index_add_(0, self.slice_index, self.delta_weight().to(weight.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, slices={self.slices} of {self.num_slices}"
