"""Mona: the Multi-cognitive Visual Adapter.

From "5%>100%: Breaking Performance Shackles of Full Fine-Tuning on Visual Recognition
Tasks" (Yin, Hu, Li, Zhang, Yang, CVPR 2025, arXiv 2408.08345). Parameter names follow the
authors' release (``project1``, ``adapter_conv.conv1..3``, ``projector``, ``gamma``,
``gammax``) so that its checkpoints load without renaming inside the module.

What the module computes, for a token map ``x`` of C channels laid out on an H x W grid::

    z = LayerNorm(x) * gamma + x * gammax          # scaled LayerNorm (gamma 1e-6, gammax 1 at init)
    m = project1(z)                                # C -> bottleneck (64)
    m = mean_k(DWConv_k(m)) + m                    # depthwise 3x3, 5x5, 7x7, averaged, plus identity
    m = projector(m) + m                           # 1x1 conv with its own skip
    out = x + project2(dropout(gelu(m)))           # bottleneck -> C, outer residual

The three depthwise kernels stay separate trainable tensors, but forward runs ONE depthwise
convolution whose kernel is assembled from them (smaller kernels zero-padded to the largest,
averaged, identity folded into the centre tap); likewise the projector's skip is folded into
its weight. Outputs and each tensor's gradient are those of the three-convolution form.
Everything runs channels-last: a (B, H, W, C) map from the backbone is never copied into
NCHW layout.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Mona", "MonaOp", "check_mona_options"]


def check_mona_options(
    *, bottleneck: int, kernel_sizes: Sequence[int], dropout: float, dim: int | None = None
) -> None:
    """Raise ``ValueError`` naming the first bad option."""
    if dim is not None and (not isinstance(dim, int) or dim <= 0):
        raise ValueError(f"`dim` must be a positive int, got {dim!r}")
    if not isinstance(bottleneck, int) or isinstance(bottleneck, bool) or bottleneck <= 0:
        raise ValueError(f"`bottleneck` must be a positive int, got {bottleneck!r}")
    if not kernel_sizes or any(not isinstance(k, int) or k <= 0 or k % 2 == 0 for k in kernel_sizes):
        raise ValueError(f"`kernel_sizes` must be positive odd ints, got {tuple(kernel_sizes)!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")


class MonaOp(nn.Module):
    """The multi-scale depthwise filter of Mona, followed by the 1x1 projector.

    Args:
        channels: Channels of the bottleneck map.
        kernel_sizes: Odd kernel sizes of the averaged depthwise convolutions.
    """

    def __init__(self, channels: int, kernel_sizes: Sequence[int] = (3, 5, 7)) -> None:
        super().__init__()
        self.channels = channels
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        # The convolution modules only hold the parameters (named and initialised as in the
        # release, PyTorch defaults); forward never calls them, it assembles one kernel.
        for i, k in enumerate(self.kernel_sizes):
            self.add_module(f"conv{i + 1}", nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels))
        self.projector = nn.Conv2d(channels, channels, kernel_size=1)

    def convs(self) -> list[nn.Conv2d]:
        return [getattr(self, f"conv{i + 1}") for i in range(len(self.kernel_sizes))]

    def merged_kernel(self) -> tuple[Tensor, Tensor]:
        """One depthwise kernel (C, 1, K, K) and bias (C,) equal to ``mean_k(conv_k(m)) + m``."""
        size = max(self.kernel_sizes)
        convs = self.convs()
        weight = sum(F.pad(c.weight, [(size - c.kernel_size[0]) // 2] * 4) for c in convs) / len(convs)
        weight[:, :, size // 2, size // 2] += 1.0  # the identity ("+ m") is a 1 at the centre tap
        bias = sum(c.bias for c in convs) / len(convs)
        return weight, bias

    def forward(self, x: Tensor, prefix: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Filter a channels-last map.

        Args:
            x: Map of shape (B, H, W, C).
            prefix: Optional isolated tokens (B, P, C), e.g. a ViT's class and register
                tokens. Each is a 1x1 map, so only the centre taps of the kernels act on it.

        Returns:
            The filtered map (B, H, W, C) and the filtered prefix tokens (or None).
        """
        weight, bias = self.merged_kernel()
        size = weight.shape[-1]
        # permute() gives an NCHW view with channels-last strides; conv2d keeps that layout.
        y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=size // 2, groups=self.channels)
        y = y.permute(0, 2, 3, 1)  # B, H, W, C (a view)
        # projector(m) + m == m @ (P + I)^T + b: one pointwise product instead of two passes.
        proj = self.projector.weight.flatten(1)
        proj = proj + torch.eye(self.channels, dtype=proj.dtype, device=proj.device)
        y = F.linear(y, proj, self.projector.bias)
        if prefix is not None:
            prefix = F.linear(prefix * weight[:, 0, size // 2, size // 2] + bias, proj, self.projector.bias)
        return y, prefix


class Mona(nn.Module):
    """Multi-cognitive Visual Adapter, applied to a residual stream after a residual add.

    Args:
        dim: Channels of the stream it adapts.
        bottleneck: Width of the bottleneck (64 in the release).
        kernel_sizes: Odd kernel sizes of the averaged depthwise convolutions ((3, 5, 7)).
        dropout: Dropout before the up-projection (0.1 in the release).

    Example:
        >>> mona = Mona(128)
        >>> mona(torch.randn(2, 14, 14, 128)).shape          # a channels-last map
        torch.Size([2, 14, 14, 128])
        >>> tokens = torch.randn(2, 1 + 14 * 14, 128)           # class token + patch tokens
        >>> mona(tokens, hw=(14, 14), num_prefix_tokens=1).shape
        torch.Size([2, 197, 128])
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int = 64,
        kernel_sizes: Sequence[int] = (3, 5, 7),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_mona_options(dim=dim, bottleneck=bottleneck, kernel_sizes=kernel_sizes, dropout=dropout)
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))  # scale of the normalised input
        self.gammax = nn.Parameter(torch.ones(dim))  # scale of the raw input
        self.project1 = nn.Linear(dim, bottleneck)
        self.adapter_conv = MonaOp(bottleneck, kernel_sizes)
        self.dropout = nn.Dropout(dropout)
        self.project2 = nn.Linear(bottleneck, dim)
        # The release's backbone init routine: truncated normal (std 0.02) linears, zero bias.
        # The up-projection is not zero-initialised, so an untrained Mona is not an identity.
        for linear in (self.project1, self.project2):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None, num_prefix_tokens: int = 0) -> Tensor:
        """Adapt a feature map.

        Args:
            x: Either a channels-last map (B, H, W, C), or tokens (B, N, C) with
                N = num_prefix_tokens + H * W, the prefix tokens first.
            hw: Grid size (H, W) of the patch tokens; required for token input.
            num_prefix_tokens: Leading tokens not on the grid (class, register tokens).

        Returns:
            A tensor shaped like ``x``.
        """
        z = self.project1(self.norm(x) * self.gamma + x * self.gammax)
        if x.ndim == 4:
            m, _ = self.adapter_conv(z)
        elif x.ndim == 3:
            if hw is None:
                raise ValueError("Mona on (B, N, C) tokens needs the grid size `hw=(H, W)`")
            B, N, _ = x.shape
            P = num_prefix_tokens
            if N != P + hw[0] * hw[1]:
                raise ValueError(
                    f"Mona got {N} tokens, but a {hw[0]}x{hw[1]} grid with {P} prefix tokens has "
                    f"{P + hw[0] * hw[1]}; are tokens being dropped or merged before this block?"
                )
            grid, prefix = z[:, P:].unflatten(1, hw), (z[:, :P] if P else None)
            grid, prefix = self.adapter_conv(grid, prefix)
            m = grid.flatten(1, 2) if prefix is None else torch.cat([prefix, grid.flatten(1, 2)], dim=1)
        else:
            raise ValueError(f"Mona expects (B, H, W, C) maps or (B, N, C) tokens, got shape {tuple(x.shape)}")
        return x + self.project2(self.dropout(F.gelu(m)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bottleneck={self.project1.out_features}, kernel_sizes={self.adapter_conv.kernel_sizes}"
