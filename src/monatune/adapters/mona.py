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

Three implementations of the same function (``Mona.impl``, or :func:`set_mona_impl` for a
whole model):

- ``"fused"`` (default): one autograd function with a hand-written backward. ``gamma`` is
  folded into the LayerNorm's affine, so the scaled LayerNorm takes one LayerNorm call and one
  in-place pass over the wide C-channel stream; the output residual is accumulated by the
  up-projection's GEMM; the depthwise backward asks for the input and the kernel
  gradients in two calls (one combined call is several times slower on CPU). For backward it
  keeps the output (the next layer, usually a LayerNorm, keeps that same tensor, so it
  costs nothing), two LayerNorm statistics, the down-projected 64-channel map and the
  dropout mask; it recovers the input as ``out - up(h)`` and recomputes the other bottleneck
  maps and the normalised input. Pure PyTorch: no compiled extension.
- ``"plain"``: the same assembled kernel written as ordinary autograd operations. Used under
  autocast, inside ``torch.compile`` and ``torch.export`` (so the compiler sees plain operations,
  no graph break), under ``torch.jit.trace`` and both ONNX exporters, for double backward, and as
  the reference of the fused path's tests.
- ``"release"``: the release's structure (three convolutions, separate projector skip, an
  NCHW view), kept so that benchmarks measure the speed-up over it.

Initialisation (``init``): ``"trunc_normal"`` (default), the Mona release's backbone init routine
(project1/project2 truncated normal std 0.02, zero bias); ``"default"``, PyTorch's ``nn.Linear``
init, as the STAR-MMRotate fork's ``SwinMona`` leaves them (its ``init_weights`` loads the
checkpoint and re-initialises nothing). LayerNorm, scales and convolutions start the same in both.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bottleneck import check_init, init_linears
from .compiled_conv import depthwise_conv2d

__all__ = ["Mona", "MonaOp", "check_mona_options", "set_mona_impl", "MONA_IMPLS"]

MONA_IMPLS = ("fused", "plain", "release")


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
        x = x.permute(0, 3, 1, 2)
        if torch.compiler.is_compiling():
            # Inductor (torch 2.14) fails on a saved view with symbolic channels-last strides ("cannot determine
            # truth value of Relational: 8*s27*s53 < 8": graph.py orders the strides without the shape env). Repro:
            #   f = torch.compile(lambda x, w: F.conv2d(x.permute(0, 3, 1, 2), w, padding=1, groups=8))
            #   for s in (5, 7): f(torch.randn(2, s, s, 8, requires_grad=True), torch.randn(8, 1, 3, 3)).sum().backward()
            # A contiguous NCHW copy is saved instead (compiled code only; eager keeps the view).
            x = x.contiguous()
        training_graph = torch.is_grad_enabled() and not torch.compiler.is_exporting()
        if torch.compiler.is_compiling() and training_graph:
            # a compiled training graph: inductor's lowering of the convolution's backward fixes the map's
            # size (one graph per size under dynamic=True); an opaque operator calls the same kernels
            y = depthwise_conv2d(x, weight, bias, size // 2)
        else:
            y = F.conv2d(x, weight, bias, padding=size // 2, groups=self.channels)
        y = y.permute(0, 2, 3, 1)  # B, H, W, C (a view)
        # projector(m) + m == m @ (P + I)^T + b: one pointwise product instead of two passes.
        proj = self.projector.weight.flatten(1)
        proj = proj + torch.eye(self.channels, dtype=proj.dtype, device=proj.device)
        y = F.linear(y, proj, self.projector.bias)
        if prefix is not None:
            prefix = F.linear(prefix * weight[:, 0, size // 2, size // 2] + bias, proj, self.projector.bias)
        return y, prefix


def _grid(t: Tensor, batch: int, prefix: int, hw: tuple[int, int]) -> Tensor:
    """The patch-grid part of (B*N, r) rows as an NCHW view with channels-last strides."""
    return t.view(batch, -1, t.shape[-1])[:, prefix:].unflatten(1, hw).permute(0, 3, 1, 2)


def _rows(grid: Tensor, other: Tensor, prefix: int, prefix_rows: Tensor | None) -> Tensor:
    """(B, r, H, W) grid output (+ prefix rows (B, P, r)) back to (B*N, r) rows like ``other``."""
    g = grid.permute(0, 2, 3, 1)  # B, H, W, r
    if not prefix:
        return g.reshape(-1, g.shape[-1])
    out = torch.empty(other.shape, dtype=grid.dtype, device=grid.device).view(g.shape[0], -1, g.shape[-1])
    out[:, prefix:] = g.flatten(1, 2)
    out[:, :prefix] = prefix_rows
    return out.view(-1, g.shape[-1])


class _MonaFunction(torch.autograd.Function):
    """Mona's forward and backward on (B*N, C) rows (see the module docstring).

    ``s``/``t`` are the LayerNorm's affine weight and bias times ``gamma``, so that
    ``z = layer_norm(x, s, t) + x * gammax`` takes one LayerNorm and one in-place pass.
    """

    @staticmethod
    def run(x, s, t, gammax, W1, b1, K, kb, P, bp, W2, b2, layout, keep, scale, eps):
        """The forward computation: the output, the LayerNorm statistics and the down-projected rows."""
        C = x.shape[-1]
        x2 = x.reshape(-1, C)
        z, mu, rstd = torch.native_layer_norm(x2, [C], s, t, eps)
        d = torch.addmm(b1, z.addcmul_(x2, gammax), W1.t())
        del z
        h = _MonaFunction._bottleneck(d, K, kb, P, bp, layout, keep, scale)[1]
        out = torch.add(x2, b2).addmm_(h, W2.t()).view(x.shape)  # the residual and bias in one pass
        return out, mu, rstd, d

    @staticmethod
    def forward(ctx, x, s, t, gammax, W1, b1, K, kb, P, bp, W2, b2, layout, keep, scale, eps):  # type: ignore[override]
        out, mu, rstd, d = _MonaFunction.run(x, s, t, gammax, W1, b1, K, kb, P, bp, W2, b2, layout, keep, scale, eps)
        # Saved: the output (the next layer, usually a LayerNorm, stores the same tensor, so it
        # costs nothing extra), the LayerNorm statistics and the bottleneck map d. The input is
        # recovered as out - up(h), and the maps after d are recomputed from it.
        ctx.save_for_backward(out, mu, rstd, d, keep, s, t, gammax, W1, K, kb, P, bp, W2, b2)
        ctx.layout, ctx.scale, ctx.eps = layout, scale, eps
        return out

    @staticmethod
    def _bottleneck(d, K, kb, P, bp, layout, keep, scale):
        """From the down-projected rows d: the filtered map m, the projector output q and h."""
        batch, prefix, hw = layout
        pad = K.shape[-1] // 2
        m_grid = F.conv2d(_grid(d, batch, prefix, hw), K, kb, padding=pad, groups=K.shape[0])
        pre = None
        if prefix:
            pre = d.view(batch, -1, d.shape[-1])[:, :prefix] * K[:, 0, pad, pad] + kb
        m = _rows(m_grid, d, prefix, pre)
        q = torch.addmm(bp, m, P.t())
        h = F.gelu(q)
        if keep is not None:
            h.mul_(keep).mul_(scale)
        return m, h, q

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):  # type: ignore[override]
        out, mu, rstd, d, keep, s, t, gammax, W1, K, kb, P, bp, W2, b2 = ctx.saved_tensors
        batch, prefix, hw = ctx.layout
        shape = dout.shape
        C, r = out.shape[-1], d.shape[-1]
        dout2 = dout.reshape(-1, C)
        m, h, q = _MonaFunction._bottleneck(d, K, kb, P, bp, ctx.layout, keep, ctx.scale)
        dW2 = dout2.t().mm(h)
        db2 = dout2.sum(0)
        x2 = torch.sub(out.view(-1, C), b2).addmm_(h, W2.t(), alpha=-1)  # the input: out - up(h)
        del h
        dh = dout2.mm(W2)
        if keep is not None:
            dh.mul_(keep).mul_(ctx.scale)
        dq = torch.ops.aten.gelu_backward(dh, q)
        del dh, q
        dP = dq.t().mm(m)
        dbp = dq.sum(0)
        dm = dq.mm(P)
        del dq, m
        dkb = dm.sum(0)
        pad = K.shape[-1] // 2
        dm_grid, d_grid = _grid(dm, batch, prefix, hw), _grid(d, batch, prefix, hw)
        conv_args = ([r], [1, 1], [pad, pad], [1, 1], False, [0, 0], r)
        # Two calls: asking for the input and weight gradients together is far slower on CPU.
        dd_grid = torch.ops.aten.convolution_backward(dm_grid, d_grid, K, *conv_args, [True, False, False])[0]
        dK = torch.ops.aten.convolution_backward(dm_grid, d_grid, K, *conv_args, [False, True, False])[1]
        pre = None
        if prefix:
            dm_pre = dm.view(batch, -1, r)[:, :prefix]
            pre = dm_pre * K[:, 0, pad, pad]
            dK[:, 0, pad, pad] += (dm_pre * d.view(batch, -1, r)[:, :prefix]).sum((0, 1))
        dd = _rows(dd_grid, d, prefix, pre)
        del dm, dd_grid
        db1 = dd.sum(0)
        z = torch.native_layer_norm(x2, [C], s, t, ctx.eps)[0].addcmul_(x2, gammax)  # recomputed, not stored
        dW1 = dd.t().mm(z)
        del z
        dz = dd.mm(W1)
        dx, ds, dt = torch.ops.aten.native_layer_norm_backward(
            dz, x2, [C], mu, rstd, s, t, [ctx.needs_input_grad[0], True, True]
        )
        dgammax = (dz * x2).sum(0)
        if dx is not None:
            dx = dx.addcmul_(dz, gammax).add_(dout2).view(shape)
        return dx, ds, dt, dgammax, dW1, db1, dK, dkb, dP, dbp, dW2, db2, None, None, None, None


def _keep_mask(shape: tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """Dropout's keep mask, Bernoulli(1 - p) (uniform draws; faster than ``bernoulli_`` on CPU)."""
    return torch.rand(shape, device=device) >= p


class Mona(nn.Module):
    """Multi-cognitive Visual Adapter, applied to a residual stream after a residual add.

    Args:
        dim: Channels of the stream it adapts.
        bottleneck: Width of the bottleneck (64 in the release).
        kernel_sizes: Odd kernel sizes of the averaged depthwise convolutions ((3, 5, 7)).
        dropout: Dropout before the up-projection (0.1 in the release).
        init: How project1/project2 start: ``"trunc_normal"`` (the Mona release) or ``"default"``
            (PyTorch's, as STAR-MMRotate's ``SwinMona``).

    ``impl`` selects one of three implementations of the same function (module docstring):
    ``"fused"`` (default), ``"plain"`` or ``"release"``.

    Example:
        >>> mona = Mona(128)
        >>> mona(torch.randn(2, 14, 14, 128)).shape          # a channels-last map
        torch.Size([2, 14, 14, 128])
        >>> tokens = torch.randn(2, 1 + 14 * 14, 128)           # class token + patch tokens
        >>> mona(tokens, hw=(14, 14), num_prefix_tokens=1).shape
        torch.Size([2, 197, 128])
    """

    impl: str = "fused"

    def __init__(
        self,
        dim: int,
        bottleneck: int = 64,
        kernel_sizes: Sequence[int] = (3, 5, 7),
        dropout: float = 0.1,
        init: str = "trunc_normal",
    ) -> None:
        super().__init__()
        check_mona_options(dim=dim, bottleneck=bottleneck, kernel_sizes=kernel_sizes, dropout=dropout)
        check_init(init)
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))  # scale of the normalised input
        self.gammax = nn.Parameter(torch.ones(dim))  # scale of the raw input
        self.project1 = nn.Linear(dim, bottleneck)
        self.adapter_conv = MonaOp(bottleneck, kernel_sizes)
        self.dropout = nn.Dropout(dropout)
        self.project2 = nn.Linear(bottleneck, dim)
        # The release's backbone init routine (truncated normal std 0.02, zero bias) or PyTorch's.
        # The up-projection is not zero-initialised, so an untrained Mona is not an identity.
        init_linears(init, self.project1, self.project2)

    def forward(
        self, x: Tensor, hw: tuple[int, int] | Sequence[tuple[int, int]] | None = None, num_prefix_tokens: int = 0
    ) -> Tensor:
        """Adapt a feature map.

        Args:
            x: Either a channels-last map (B, H, W, C), or tokens (B, N, C) with
                N = num_prefix_tokens + H * W, the prefix tokens first.
            hw: Grid size (H, W) of the patch tokens; required for token input. A list of grid sizes
                (``[(H1, W1), (H2, W2), ...]``) means packed tokens: the images' sequences one after another along N (each its
                ``num_prefix_tokens`` then its H_i * W_i patch tokens), as encoders that pack
                images of different sizes into one sequence hold them; each image is filtered on
                its own grid.
            num_prefix_tokens: Leading tokens not on the grid (class, register tokens), per image.

        Returns:
            A tensor shaped like ``x``.
        """
        if isinstance(hw, list):  # packed images; a single grid is a tuple (of ints, or of traced sizes)
            return self._packed(x, [tuple(g) for g in hw], num_prefix_tokens)
        if x.ndim == 4:
            hw, P = (x.shape[1], x.shape[2]), 0
        elif x.ndim == 3:
            if hw is None:
                raise ValueError("Mona on (B, N, C) tokens needs the grid size `hw=(H, W)`")
            P = num_prefix_tokens
            if x.shape[1] != P + hw[0] * hw[1]:
                raise ValueError(
                    f"Mona got {x.shape[1]} tokens, but a {hw[0]}x{hw[1]} grid with {P} prefix tokens has "
                    f"{P + hw[0] * hw[1]}; are tokens being dropped or merged before this block?"
                )
        else:
            raise ValueError(f"Mona expects (B, H, W, C) maps or (B, N, C) tokens, got shape {tuple(x.shape)}")
        if self.impl not in MONA_IMPLS:
            raise ValueError(f"unknown Mona implementation {self.impl!r}; choose from {MONA_IMPLS}")
        keep = None
        p = self.dropout.p
        if self.training and p > 0:
            keep = _keep_mask((*x.shape[:-1], self.project1.out_features), p, x.device)
        if self.impl == "release" or torch.onnx.is_in_onnx_export():
            # the TorchScript ONNX exporter cannot give a convolution a kernel computed in the graph (the
            # assembled one): it gets the release's three convolutions, whose kernels are parameters
            return self._release(x, tuple(hw), P, keep)
        if self.impl == "fused" and self._can_fuse(x):
            return self._fused(x, tuple(hw), P, keep)
        return self._plain(x, tuple(hw), P, keep)

    def _packed(self, x: Tensor, grids: list[tuple[int, int]], P: int) -> Tensor:
        sizes = [P + h * w for h, w in grids]
        if x.ndim != 3 or x.shape[1] != sum(sizes):
            raise ValueError(
                f"Mona got tokens {tuple(x.shape)}, but {len(grids)} packed images with grids {grids} and {P} prefix "
                f"tokens each have {sum(sizes)} along dim 1"
            )
        parts = x.split(sizes, dim=1)
        return torch.cat([self.forward(t, hw=g, num_prefix_tokens=P) for t, g in zip(parts, grids)], dim=1)

    def _can_fuse(self, x: Tensor) -> bool:
        """The fused autograd function runs only in eager mode: graph capture (torch.compile, torch.export,
        the dynamo ONNX exporter) and tracing (torch.jit.trace, the TorchScript ONNX exporter, which cannot
        record a Python autograd function) get the plain operations, and so does autocast."""
        capturing = torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
        if capturing or torch.onnx.is_in_onnx_export() or torch.is_autocast_enabled(x.device.type):
            return False
        return x.dtype in (torch.float32, torch.float64) and x.dtype == self.project1.weight.dtype

    def _drop(self, g: Tensor, keep: Tensor | None) -> Tensor:
        return g if keep is None else g * keep / (1.0 - self.dropout.p)

    def _fused(self, x: Tensor, hw: tuple[int, int], P: int, keep: Tensor | None) -> Tensor:
        K, kb = self.adapter_conv.merged_kernel()
        r = self.adapter_conv.channels
        proj = self.adapter_conv.projector
        W1 = self.project1.weight
        Pm = proj.weight.flatten(1) + torch.eye(r, dtype=W1.dtype, device=W1.device)  # projector + its skip
        args = (
            x, self.norm.weight * self.gamma, self.norm.bias * self.gamma, self.gammax, W1, self.project1.bias,
            K, kb, Pm, proj.bias, self.project2.weight, self.project2.bias,
            (x.shape[0], P, hw), None if keep is None else keep.view(-1, r), 1.0 / (1.0 - self.dropout.p), self.norm.eps,
        )
        if not torch.is_grad_enabled():  # inference: no autograd bookkeeping
            return _MonaFunction.run(*args)[0]
        return _MonaFunction.apply(*args)

    def _plain(self, x: Tensor, hw: tuple[int, int], P: int, keep: Tensor | None) -> Tensor:
        z = self.project1(self.norm(x) * self.gamma + x * self.gammax)
        if x.ndim == 4:
            m, _ = self.adapter_conv(z)
        else:
            grid, prefix = z[:, P:].unflatten(1, hw), (z[:, :P] if P else None)
            grid, prefix = self.adapter_conv(grid, prefix)
            m = grid.flatten(1, 2) if prefix is None else torch.cat([prefix, grid.flatten(1, 2)], dim=1)
        return x + self.project2(self._drop(F.gelu(m), keep))

    def _release(self, x: Tensor, hw: tuple[int, int], P: int, keep: Tensor | None) -> Tensor:
        """The release's structure: three convolutions on an NCHW view, the projector's skip apart."""
        identity = x
        z = self.project1(self.norm(x) * self.gamma + x * self.gammax)
        tokens = z.flatten(1, 2) if z.ndim == 4 else z
        op = self.adapter_conv
        m = tokens[:, P:].reshape(tokens.shape[0], hw[0], hw[1], -1).permute(0, 3, 1, 2)
        convs = op.convs()
        m = sum(conv(m) for conv in convs) / len(convs) + m
        m = op.projector(m) + m
        m = m.permute(0, 2, 3, 1).flatten(1, 2)
        if P:  # isolated tokens: 1x1 maps, where each convolution is its centre tap
            pre = tokens[:, :P]
            pre = sum(pre * c.weight[:, 0, c.kernel_size[0] // 2, c.kernel_size[1] // 2] + c.bias for c in convs) / len(convs) + pre
            pre = F.linear(pre, op.projector.weight.flatten(1), op.projector.bias) + pre
            m = torch.cat([pre, m], dim=1)
        m = m.reshape(*identity.shape[:-1], -1)
        return identity + self.project2(self._drop(F.gelu(m), keep))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bottleneck={self.project1.out_features}, kernel_sizes={self.adapter_conv.kernel_sizes}"


def set_mona_impl(model: nn.Module, impl: str) -> int:
    """Set the implementation (``"fused"``, ``"plain"`` or ``"release"``) of every Mona in ``model``.

    Returns the number of Mona modules changed.
    """
    if impl not in MONA_IMPLS:
        raise ValueError(f"unknown Mona implementation {impl!r}; choose from {MONA_IMPLS}")
    count = 0
    for module in model.modules():
        if isinstance(module, Mona):
            module.impl = impl
            count += 1
    return count
