"""Mona's depthwise convolution as an operator that inductor calls instead of lowering.

Inductor (torch 2.14) cannot lower a convolution's backward with respect to its input for symbolic
sizes: ``convolution_backward_lowering`` turns the input gradient's strides into integers
(``guard_int_seq`` on the layout; with layout optimisation, a channels-last requirement that does the
same), so a graph compiled with ``dynamic=True`` guards on the map's size and recompiles for every new one.
Repro (three graphs where there should be one)::

    w = torch.randn(8, 1, 3, 3, requires_grad=True)
    f = torch.compile(lambda x, w: F.conv2d(x, w, padding=1, groups=8), dynamic=True)
    for s in (5, 7, 9):
        f(torch.randn(2, 8, s, s + 1, requires_grad=True), w).sum().backward()
    torch._dynamo.utils.counters["stats"]["unique_graphs"]  # 3 (1 with backend="aot_eager")

The convolution itself is never generated code (inductor calls ATen's kernel for it either way), so
an opaque custom operator with its own backward operator costs nothing: the compiled graph calls the
same kernels, and keeps one graph for every size. :class:`~monatune.adapters.mona.MonaOp` uses it only
when a compiled graph trains (``torch.compile`` with grad enabled); eager code, inference and
``torch.export`` keep ``F.conv2d``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["depthwise_conv2d"]


@torch.library.custom_op("monatune::depthwise_conv2d", mutates_args=())
def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor, padding: int) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=padding, groups=C)`` on a contiguous (B, C, H, W) map."""
    return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1]).contiguous()


@depthwise_conv2d.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, padding: int) -> Tensor:
    return x.new_empty(x.shape)  # stride 1 and "same" padding; contiguous, as the real output


@torch.library.custom_op("monatune::depthwise_conv2d_backward", mutates_args=())
def depthwise_conv2d_backward(grad: Tensor, x: Tensor, weight: Tensor, padding: int) -> tuple[Tensor, Tensor, Tensor]:
    """The input, kernel and bias gradients of :func:`depthwise_conv2d`."""
    grads = torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]], [1, 1], [padding, padding], [1, 1], False, [0, 0], x.shape[1],
        [True, True, True],
    )  # fmt: skip
    return tuple(g.contiguous() for g in grads)  # type: ignore[return-value]


@depthwise_conv2d_backward.register_fake
def _(grad: Tensor, x: Tensor, weight: Tensor, padding: int) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding = padding


def _backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = depthwise_conv2d_backward(grad.contiguous(), x, weight, ctx.padding)
    return grad_x, grad_weight, grad_bias, None


depthwise_conv2d.register_autograd(_backward, setup_context=_setup_context)
