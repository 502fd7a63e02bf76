"""The deployable form of a tuned network: merged weights, and Mona with everything precomputed.

:func:`fold` turns a tuned network into the network that inference needs, in place:

- the methods that merge (LoRA, SSF) are merged into the weights they modify, and the in-place
  methods (bitfit, norm, partial-1, full, fixed) already are the weights; both leave a plain
  network with no adapter operation (:func:`monatune.unapply` with ``merge=True``);
- every Mona becomes a :class:`FoldedMona`, which computes Mona's eval-mode function (no dropout)
  from weights assembled once: the three depthwise kernels as one kernel and bias
  (:meth:`monatune.adapters.mona.MonaOp.merged_kernel`), the projector's skip folded into its
  weight (``projector.weight + I``), and the scaled LayerNorm ``LN(x) * gamma + x * gammax`` as one
  LayerNorm whose affine is ``weight * gamma``, ``bias * gamma``, plus the ``x * gammax`` term;
- the other methods (Adapter, AdaptFormer, LoRand, VPT) stay as they are, in eval mode.

``gammax`` is not folded further into ``project1``: ``project1(LN'(x) + x * gammax)`` would become
two products (``W1 LN'(x) + (W1 diag(gammax)) x``), exact but dearer than one multiply-add on the stream.

Since every kernel is a parameter, the folded network captures everywhere: ``torch.export`` with
dynamic sizes and both ONNX exporters (the TorchScript one cannot give a convolution a kernel
computed in the graph, which is why an unfolded Mona falls back to the release's three convolutions there).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.mona import Mona
from ..methods import METHODS
from ..tuning import adapter_modules, get_state, remove_adapter, unapply

__all__ = ["FoldedMona", "fold"]


class FoldedMona(nn.Module):
    """Mona in eval mode with its weights assembled once (built by :meth:`from_mona`).

    ``norm`` is the LayerNorm with ``gamma`` folded into its affine, ``conv`` the one depthwise
    convolution (kernel and bias of the averaged multi-scale kernels plus the identity), ``projector``
    the 1x1 projector with its skip folded in. Input and output as :class:`~monatune.Mona`: a
    channels-last map (B, H, W, C), or tokens (B, N, C) with ``hw`` and ``num_prefix_tokens``.
    """

    def __init__(self, dim: int, bottleneck: int, kernel_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.gammax = nn.Parameter(torch.ones(dim))
        self.project1 = nn.Linear(dim, bottleneck)
        self.conv = nn.Conv2d(bottleneck, bottleneck, kernel_size, padding=kernel_size // 2, groups=bottleneck)
        self.projector = nn.Linear(bottleneck, bottleneck)
        self.project2 = nn.Linear(bottleneck, dim)
        # what a prefix token (a 1x1 map) sees of the depthwise kernel: its centre tap
        self.register_buffer("centre", torch.ones(bottleneck))

    @classmethod
    @torch.no_grad()
    def from_mona(cls, mona: Mona) -> "FoldedMona":
        """The folded copy of ``mona`` (same device and dtype); ``mona`` is left as it is."""
        weight = mona.project1.weight
        kernel, kernel_bias = mona.adapter_conv.merged_kernel()
        size, r = kernel.shape[-1], kernel.shape[0]
        folded = cls(mona.dim, r, size, eps=mona.norm.eps).to(device=weight.device, dtype=weight.dtype)
        folded.norm.weight.copy_(mona.norm.weight * mona.gamma)
        folded.norm.bias.copy_(mona.norm.bias * mona.gamma)
        folded.gammax.copy_(mona.gammax)
        folded.project1.load_state_dict(mona.project1.state_dict())
        folded.conv.weight.copy_(kernel)
        folded.conv.bias.copy_(kernel_bias)
        folded.centre.copy_(kernel[:, 0, size // 2, size // 2])
        proj = mona.adapter_conv.projector
        folded.projector.weight.copy_(proj.weight.flatten(1) + torch.eye(r, dtype=weight.dtype, device=weight.device))
        folded.projector.bias.copy_(proj.bias)
        folded.project2.load_state_dict(mona.project2.state_dict())
        return folded.eval().requires_grad_(False)

    def _filter(self, grid: Tensor) -> Tensor:
        """Depthwise filter and projector of a (B, H, W, r) map."""
        y = self.conv(grid.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # B, H, W, r (views, channels-last)
        return self.projector(y)

    def forward(
        self, x: Tensor, hw: tuple[int, int] | Sequence[tuple[int, int]] | None = None, num_prefix_tokens: int = 0
    ) -> Tensor:
        """As :meth:`monatune.Mona.forward` in eval mode."""
        if isinstance(hw, list):  # packed images, one grid each (see Mona.forward)
            P = num_prefix_tokens
            parts = x.split([P + h * w for h, w in hw], dim=1)
            return torch.cat([self.forward(t, hw=tuple(g), num_prefix_tokens=P) for t, g in zip(parts, hw)], dim=1)
        z = self.project1(torch.addcmul(self.norm(x), x, self.gammax))  # LN(x) * gamma + x * gammax, projected
        if x.ndim == 4:
            m = self._filter(z)
        else:
            if hw is None:
                raise ValueError("Mona on (B, N, C) tokens needs the grid size `hw=(H, W)`")
            P = num_prefix_tokens
            m = self._filter(z[:, P:].unflatten(1, tuple(hw))).flatten(1, 2)
            if P:
                prefix = self.projector(z[:, :P] * self.centre + self.conv.bias)
                m = torch.cat([prefix, m], dim=1)
        return x + self.project2(F.gelu(m))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bottleneck={self.project1.out_features}, kernel_size={self.conv.kernel_size[0]}"


def _tuned_parts(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`monatune.apply` tuned (the model itself, or a task network's backbone), outermost first."""
    return [m for m in model.modules() if get_state(m) is not None]


def _fold_part(part: nn.Module) -> None:
    state = get_state(part)
    assert state is not None
    if state.active is None:  # adapters disabled: the base network is what runs
        unapply(part)
        return
    for name in [n for n in state.adapters if n != state.active]:
        remove_adapter(part, name)
    cls = METHODS[state.adapters[state.active].method]
    if cls.mergeable or cls.in_place:
        unapply(part, merge=True)  # a plain network with the adapter's effect in its weights
        return
    for qualname, _, adapter in list(adapter_modules(part, state.active)):
        if isinstance(adapter, Mona):
            bank_name, key = qualname.rsplit(".", 1)
            part.get_submodule(bank_name)[key] = FoldedMona.from_mona(adapter)


def fold(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """The deployable form of a tuned network: merged weights, folded Mona, eval mode, nothing trainable.

    Works on a tuned model (:func:`monatune.apply`) or on a network holding one (a segmenter or
    detector whose backbone was tuned). Inactive adapters are removed; adapters turned off with
    :func:`monatune.disable_adapters` leave the base network. A folded Mona keeps no separate kernels,
    so the result is for inference and export, not for training or :func:`monatune.save_adapter`.

    Args:
        model: The tuned network.
        inplace: Change ``model`` itself (default); False folds a deep copy and leaves ``model`` as it is.

    Returns:
        The folded network (``model`` itself when ``inplace``).

    Example:
        >>> model = monatune.apply(timm.create_model("swin_tiny_patch4_window7_224"), "mona")
        >>> deployable = fold(model, inplace=False)
        >>> torch.testing.assert_close(deployable(x), model.eval()(x))
    """
    if not _tuned_parts(model):
        raise ValueError(
            f"{type(model).__name__} holds no module tuned by monatune.apply; there is nothing to fold "
            "(a plain network is already deployable)"
        )
    if not inplace:
        model = copy.deepcopy(model)
    for part in _tuned_parts(model):
        _fold_part(part)
    return model.eval().requires_grad_(False)
