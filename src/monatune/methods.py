"""Tuning methods by name: each is an options dataclass that builds the adapter for a width.

``METHODS`` maps the name given to :func:`monatune.apply` (and ``--method`` on the command
line) to its options class. Options are checked in ``__post_init__``, before any model is
touched.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from .adapters.mona import Mona, check_mona_options

__all__ = ["METHODS", "MethodOptions", "MonaOptions", "resolve_method"]


@dataclass
class MethodOptions:
    """Base of every method's options."""

    name: ClassVar[str]
    #: Block slots the method fills, in the tuned blocks of ``monatune.models``.
    slots: ClassVar[tuple[str, ...]] = ()

    def build(self, dim: int) -> nn.Module:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class MonaOptions(MethodOptions):
    """Mona (CVPR 2025): one adapter after each residual add of every block."""

    name: ClassVar[str] = "mona"
    slots: ClassVar[tuple[str, ...]] = ("after_attn", "after_mlp")

    bottleneck: int = 64  # width of the bottleneck
    kernel_sizes: tuple[int, ...] = (3, 5, 7)  # averaged depthwise kernels (odd)
    dropout: float = 0.1  # before the up-projection

    def __post_init__(self) -> None:
        self.kernel_sizes = tuple(self.kernel_sizes)
        check_mona_options(bottleneck=self.bottleneck, kernel_sizes=self.kernel_sizes, dropout=self.dropout)

    def build(self, dim: int) -> nn.Module:
        return Mona(dim, bottleneck=self.bottleneck, kernel_sizes=self.kernel_sizes, dropout=self.dropout)


METHODS: dict[str, type[MethodOptions]] = {cls.name: cls for cls in (MonaOptions,)}


def resolve_method(method: str, options: dict[str, Any] | None = None) -> MethodOptions:
    """Options object for ``method``; ``ValueError`` for an unknown name or option."""
    if method not in METHODS:
        raise ValueError(f"unknown tuning method {method!r}; supported: {', '.join(sorted(METHODS))}")
    cls = METHODS[method]
    options = dict(options or {})
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; its options are {allowed}")
    return cls(**options)
