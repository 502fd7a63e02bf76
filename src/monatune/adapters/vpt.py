"""VPT: learned prompt tokens that join the token sequence of a frozen transformer.

From "Visual Prompt Tuning" (Jia, Tang, Chen, Cardie, Belongie, Hariharan, Lim; ECCV 2022).

- ViT: ``num_tokens`` prompts are inserted after the prefix (class/register) tokens.
  *Deep*: every block has its own prompts; the previous block's prompt outputs are
  dropped. *Shallow*: prompts are inserted before the first block and travel through all
  blocks; only the first block owns parameters.
- Swin: the prompts are prepended to the tokens of every window inside the window
  attention (zero relative-position bias and no shift mask for them); the prompt outputs
  are averaged over the windows, as in the VPT authors' Swin code. Deep: new prompts in
  every block. Shallow: the prompts pass through every block and, at each stage boundary,
  through that stage's patch merging (the prompt repeated four times, then the merging's
  LayerNorm and reduction).

Each block keeps its own input and output shape: the block inserts the prompts, runs, and
takes them out again; a shallow prompt's outputs are handed to the next block through a
:class:`PromptCarry` shared by the blocks of one adapter.
Initialisation: uniform in +-sqrt(6 / (3 * patch_area + dim)), as in VPT.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .bottleneck import check_dropout, check_positive_int

__all__ = ["Prompt", "PromptCarry"]


class PromptCarry:
    """Holds a shallow prompt's tokens between blocks during one forward pass."""

    def __init__(self) -> None:
        self.tokens: Tensor | None = None


class Prompt(nn.Module):
    """The prompts of one block.

    Args:
        dim: Token width at this block.
        num_tokens: Number of prompt tokens.
        dropout: Dropout on the prompts as they enter the block.
        learned: Whether this block owns prompt parameters (deep: every block; shallow:
            the first block only). Otherwise it takes the tokens carried from the block before.
        carry: Shared carrier for shallow prompts (None for deep).
        last: This block ends the prompts' journey (shallow): nothing is carried further.
        patch_area: Pixels per patch, for the initialisation range.
    """

    def __init__(
        self,
        dim: int,
        num_tokens: int = 10,
        dropout: float = 0.0,
        *,
        learned: bool = True,
        carry: PromptCarry | None = None,
        last: bool = False,
        patch_area: int = 16,
    ) -> None:
        super().__init__()
        check_positive_int("num_tokens", num_tokens)
        check_dropout(dropout)
        self.num_tokens = num_tokens
        self.dropout = nn.Dropout(dropout)
        self.last = last
        self.__dict__["carry"] = carry  # shared, not a submodule
        self.__dict__["merge_layer"] = None  # a stage's patch merging, for carried Swin prompts
        if learned:
            bound = math.sqrt(6.0 / (3 * patch_area + dim))
            self.tokens = nn.Parameter(torch.empty(num_tokens, dim).uniform_(-bound, bound))
        else:
            self.tokens = None

    @property
    def carries(self) -> bool:
        """Whether this block's prompt outputs go on to the next block."""
        return self.carry is not None and not self.last

    def enter(self, batch: int, like: Tensor) -> Tensor:
        """The prompts for this block, (batch, num_tokens, dim)."""
        if self.tokens is not None:
            tokens = self.tokens.to(like.dtype).unsqueeze(0).expand(batch, -1, -1)
        else:
            tokens = self.carry.tokens if self.carry is not None else None
            if tokens is None:
                raise RuntimeError("shallow VPT: no prompts were carried into this block; are blocks run out of order?")
            if self.merge_layer is not None:  # stage boundary: through patch merging like a 2x2 patch
                tokens = self.merge_layer.reduction(self.merge_layer.norm(torch.cat([tokens] * 4, dim=-1)))
        return self.dropout(tokens)

    def leave(self, tokens: Tensor) -> None:
        """Hand this block's prompt outputs to the next block (shallow), or drop them."""
        if self.carry is not None:
            self.carry.tokens = tokens if self.carries else None

    def extra_repr(self) -> str:
        kind = "learned" if self.tokens is not None else "carried"
        return f"num_tokens={self.num_tokens}, {kind}{', last' if self.last else ''}"
