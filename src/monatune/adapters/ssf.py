"""SSF: scale and shift the features after each operation of a frozen backbone.

From "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning"
(Lian, Zhou, Feng, Wang; NeurIPS 2022). After every operation the paper names (the
attention's qkv and output projections, the MLP's two linears, every LayerNorm, the
patch embedding and, in Swin, patch merging) the output is transformed channel-wise::

    y = gamma * op(x) + beta             gamma ~ N(1, 0.02), beta ~ N(0, 0.02) at init

Because it follows a linear operation (or LayerNorm's affine), it merges into that
operation's weight and bias: ``W' = gamma W``, ``b' = gamma b + beta``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .bottleneck import check_positive_int

__all__ = ["SSF"]


class SSF(nn.Module):
    """Channel-wise scale and shift of a host's output; called as ``ssf(x, y)``.

    Args:
        dim: Channels of the host's output.
        channel_dim: Which dimension holds the channels (-1 for linears and LayerNorm,
            1 for a convolution's NCHW output).
    """

    merged: bool

    def __init__(self, dim: int, channel_dim: int = -1) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        self.channel_dim = channel_dim
        self.scale = nn.Parameter(torch.empty(dim))
        self.shift = nn.Parameter(torch.empty(dim))
        nn.init.normal_(self.scale, mean=1.0, std=0.02)
        nn.init.normal_(self.shift, std=0.02)
        self.merged = False

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if self.channel_dim == -1:
            return y * self.scale + self.shift
        shape = [1] * y.ndim
        shape[self.channel_dim] = -1
        return y * self.scale.view(shape) + self.shift.view(shape)

    @torch.no_grad()
    def merge_into(self, host: nn.Module) -> None:
        """Fold into the host's weight and bias (a bias is added to a bias-free host)."""
        weight = host.weight
        scale = self.scale.to(weight.dtype)
        weight.mul_(scale.view(-1, *[1] * (weight.ndim - 1)))
        if host.bias is None:
            host.bias = nn.Parameter(torch.zeros_like(scale), requires_grad=False)
        host.bias.mul_(scale).add_(self.shift.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"dim={self.scale.numel()}, channel_dim={self.channel_dim}"
