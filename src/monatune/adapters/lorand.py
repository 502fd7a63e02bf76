"""LoRand: a bottleneck adapter whose projections are sums of small low-rank products.

From "1% VS 100%: Parameter-Efficient Low Rank Adapter for Dense Predictions" (Yin, Yang,
Wang, Wang, Li; CVPR 2023). Each projection matrix is assembled from ``branches`` products
``P_i K_i Q_i`` with a ``rank x rank`` kernel ``K_i`` shared by the down- and
up-projection of the same branch::

    W_down = sum_i (P_i K_i Q_i)^T      P_i: C x r, K_i: r x r, Q_i: r x m
    W_up   = sum_i  U_i K_i V_i         U_i: m x r,             V_i: r x C
    LoRand(x) = x + W_up gelu(W_down x + b_down) + b_up

It sits where the Houlsby adapter does: on the attention output and on the MLP output,
before each residual add.

Defaults: ``branches=2``, ``rank=8`` and a bottleneck of half the width (m = C/2). On
Swin-B that is 1,197,312 parameters (24 blocks x 2 adapters), the 1.20M the LoRand paper
reports; ``monatune params swin_base_patch4_window7_224 --method lorand`` prints it.
Initialisation follows the authors' code: Kaiming-uniform (a=sqrt(5)) factors, uniform
biases in +-1/sqrt(fan_in).

``shared_kernel=False`` gives the down- and up-projection a kernel each (``kernel`` and
``up_kernel``), as the STAR-MMRotate fork's ``SwinLoRand`` builds them (two independent
``Lorand_Multi`` layers, ``W_up = sum_i U_i K'_i V_i``); that fork uses 4 branches of rank 8.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bottleneck import check_positive_int

__all__ = ["LoRand"]


class LoRand(nn.Module):
    """LoRand adapter.

    Args:
        dim: Channels in and out.
        bottleneck: Hidden width (default ``dim // 2``).
        rank: Size of each branch's kernel (``beta`` in the paper).
        branches: Number of low-rank products summed per projection (``alpha``).
        shared_kernel: One kernel per branch for both projections (the paper), or one each
            (``up_kernel`` for the up-projection; STAR-MMRotate's code).
    """

    def __init__(
        self, dim: int, bottleneck: int | None = None, rank: int = 8, branches: int = 2, shared_kernel: bool = True
    ) -> None:
        super().__init__()
        bottleneck = max(1, dim // 2) if bottleneck is None else bottleneck
        for name, value in (("dim", dim), ("bottleneck", bottleneck), ("rank", rank), ("branches", branches)):
            check_positive_int(name, value)
        if not isinstance(shared_kernel, bool):
            raise ValueError(f"`shared_kernel` must be True or False, got {shared_kernel!r}")
        self.dim, self.bottleneck, self.rank, self.branches = dim, bottleneck, rank, branches
        self.shared_kernel = shared_kernel
        r, m, a = rank, bottleneck, branches
        self.down_p = nn.Parameter(torch.empty(a, dim, r))
        self.down_q = nn.Parameter(torch.empty(a, r, m))
        self.kernel = nn.Parameter(torch.empty(a, r, r))
        self.register_parameter("up_kernel", None if shared_kernel else nn.Parameter(torch.empty(a, r, r)))
        self.up_p = nn.Parameter(torch.empty(a, m, r))
        self.up_q = nn.Parameter(torch.empty(a, r, dim))
        self.down_bias = nn.Parameter(torch.empty(m))
        self.up_bias = nn.Parameter(torch.empty(dim))
        for factor in (self.down_p, self.down_q, self.kernel, self.up_kernel, self.up_p, self.up_q):
            for i in range(a if factor is not None else 0):
                nn.init.kaiming_uniform_(factor.data[i], a=math.sqrt(5))
        nn.init.uniform_(self.down_bias, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
        nn.init.uniform_(self.up_bias, -1 / math.sqrt(m), 1 / math.sqrt(m))

    def weights(self) -> tuple[Tensor, Tensor]:
        """The assembled down (m x C) and up (C x m) projection matrices."""
        up_kernel = self.kernel if self.up_kernel is None else self.up_kernel
        down = torch.einsum("acr,ars,asm->mc", self.down_p, self.kernel, self.down_q)
        up = torch.einsum("amr,ars,asc->cm", self.up_p, up_kernel, self.up_q)
        return down, up

    def forward(self, x: Tensor) -> Tensor:
        down, up = self.weights()
        return x + F.linear(F.gelu(F.linear(x, down, self.down_bias)), up, self.up_bias)

    def extra_repr(self) -> str:
        shared = "" if self.shared_kernel else ", shared_kernel=False"
        return f"dim={self.dim}, bottleneck={self.bottleneck}, rank={self.rank}, branches={self.branches}{shared}"
