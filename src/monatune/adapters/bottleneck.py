"""Bottleneck adapters: the Houlsby adapter and AdaptFormer's parallel branch.

- Adapter (Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019), as
  the Mona release places it in Swin: on the attention output and on the MLP output,
  inside DropPath, before each residual add, with its own skip::

      x = x + DropPath(Adapter(Attention(LN1(x))))      Adapter(y) = y + up(dropout(gelu(down(y))))
      x = x + DropPath(Adapter(MLP(LN2(x))))

- AdaptFormer (Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable
  Visual Recognition", NeurIPS 2022): one branch per block, parallel to the MLP, fed the
  stream before LN2, scaled (0.1) and without a skip or inner LayerNorm (as released)::

      x = x + DropPath(MLP(LN2(x))) + 0.1 * up(dropout(gelu(down(x))))

Parameter names (``project1``, ``project2``, ``dropout``) are the release's.

Initialisation (``init``): ``"trunc_normal"`` (default) is the Mona release's: its backbones'
init routine reaches the adapters, truncated normal (std 0.02) weights, zero biases.
``"default"`` keeps PyTorch's ``nn.Linear`` init (Kaiming-uniform weights, uniform biases), as the
STAR-MMRotate fork's Swin backbones leave them: their ``init_weights`` only loads the checkpoint.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Bottleneck", "INITS", "check_positive_int", "check_dropout", "check_init", "init_linears"]

#: How adapter linears start: the Mona release's truncated normal, or PyTorch's default.
INITS = ("trunc_normal", "default")


def check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")


def check_dropout(value: object, name: str = "dropout") -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")


def check_init(value: object) -> None:
    if value not in INITS:
        raise ValueError(f"`init` must be one of {INITS}, got {value!r}")


def init_linears(init: str, *linears: nn.Linear) -> None:
    """``"trunc_normal"``: weights truncated normal (std 0.02), biases 0; ``"default"``: left as PyTorch made them."""
    check_init(init)
    if init == "trunc_normal":
        for linear in linears:
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)


class Bottleneck(nn.Module):
    """``scale * up(dropout(gelu(down(x))))``, plus ``x`` when ``residual``.

    Args:
        dim: Channels in and out (the last dimension of the input).
        bottleneck: Hidden width (64 in the release).
        dropout: Dropout before the up-projection (0.1 in the release).
        scale: Factor on the branch (1 for the Houlsby adapter, 0.1 for AdaptFormer).
        residual: Add the input (Houlsby) or return the branch alone (AdaptFormer).
        init: ``"trunc_normal"`` (the Mona release) or ``"default"`` (PyTorch's, as STAR-MMRotate).
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int = 64,
        dropout: float = 0.1,
        scale: float = 1.0,
        residual: bool = True,
        init: str = "trunc_normal",
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("bottleneck", bottleneck)
        check_dropout(dropout)
        check_init(init)
        self.scale = float(scale)
        self.residual = residual
        self.project1 = nn.Linear(dim, bottleneck)
        self.dropout = nn.Dropout(dropout)
        self.project2 = nn.Linear(bottleneck, dim)
        init_linears(init, self.project1, self.project2)  # see the module docstring

    def forward(self, x: Tensor) -> Tensor:
        y = self.project2(self.dropout(F.gelu(self.project1(x))))
        if self.scale != 1.0:
            y = y * self.scale
        return x + y if self.residual else y

    def extra_repr(self) -> str:
        return f"scale={self.scale}, residual={self.residual}"
