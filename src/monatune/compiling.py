"""Compiled training: the ``compile`` option of the tasks and the size buckets it pads batches to.

``torch.compile`` specialises a graph to its input shapes. Classification (fixed crops) and
semantic segmentation (fixed training crops, fixed sliding windows) see one or two shapes, so a
compiled network costs one compile per shape. Detection trains on multi-scale inputs: every
batch has its own padded size, and each new size recompiles. With dynamic shapes a Swin's
window partition (pad to whole windows, roll, partition, reverse, at every stage) becomes sympy
expressions that inductor simplifies for minutes per graph (see ``docs/benchmarks.md``), so the
default here is static shapes with **size buckets**: each side of a batch is padded up to a
multiple of ``size_buckets`` (or the smallest listed size that holds it) instead of 32. The
padding is what padding to 32 already is (zeros on the right and bottom, the images' own sizes
kept for boxes and anchors), only more of it, and the number of shapes becomes small enough to
compile each once.

Example config::

    model:
      init_args:
        compile: {size_buckets: 256}        # or: compile: true (defaults below)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["CompileOptions", "compile_options", "padded_side", "compile_module", "INDUCTOR_OPTIONS"]

# Inductor options the compile option passes unless ``options`` is given. Inductor's layout optimisation
# (convolution inputs made channels-last) fixes the first size's strides into the backward graph of a
# Mona on prefixed tokens (torch 2.14: "expected ... stride 224==120" at the second size of a
# dynamic-shape ViT); without it the graph is correct at every size. Pass the same to torch.compile yourself:
# ``torch.compile(model, dynamic=True, options=monatune.compiling.INDUCTOR_OPTIONS)``.
INDUCTOR_OPTIONS: dict[str, Any] = {"layout_optimization": False}

_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileOptions:
    """How a task compiles its network.

    Args:
        backend: ``torch.compile``'s backend (``inductor``; ``aot_eager`` to check capture without code generation).
        mode: ``torch.compile``'s mode (inductor; ``default`` passes :data:`INDUCTOR_OPTIONS` instead).
        dynamic: ``torch.compile``'s ``dynamic``: ``False`` (default) compiles each shape on its own;
            ``True`` one graph for all sizes; ``None`` torch's automatic choice (static first, dynamic
            after a size changes).
        size_buckets: Detection only: pad each side of a batch up to a multiple of this int, or up to the
            smallest size in this list that holds it (sides larger than the largest are padded to a
            multiple of 32 as before). ``None``: padding to 32 only.
        recompile_limit: How many shapes one compiled function may be compiled for before torch falls back
            to eager (``torch._dynamo.config.recompile_limit``, 8 by default in torch).
        extra: Inductor options (the config's ``options`` key), added to :data:`INDUCTOR_OPTIONS`.
    """

    backend: str = "inductor"
    mode: str = "default"
    dynamic: bool | None = False
    size_buckets: int | tuple[int, ...] | None = None
    recompile_limit: int = 64
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"compile `mode` must be one of {_MODES}, got {self.mode!r}")
        if self.dynamic not in (True, False, None):
            raise ValueError(f"compile `dynamic` must be true, false or null, got {self.dynamic!r}")
        buckets = self.size_buckets
        if buckets is not None:
            sizes = (buckets,) if isinstance(buckets, int) else tuple(buckets)
            if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
                raise ValueError(f"compile `size_buckets` must be a positive int or a list of them, got {buckets!r}")
            object.__setattr__(self, "size_buckets", buckets if isinstance(buckets, int) else tuple(sorted(sizes)))
        if not isinstance(self.recompile_limit, int) or self.recompile_limit < 1:
            raise ValueError(f"compile `recompile_limit` must be a positive int, got {self.recompile_limit!r}")


def compile_options(value: bool | Mapping[str, Any] | None) -> CompileOptions | None:
    """The ``compile`` option of a task config: ``None``/``False`` (eager), ``True`` (defaults) or a mapping."""
    if value is None or value is False:
        return None
    if value is True:
        return CompileOptions()
    if not isinstance(value, Mapping):
        raise TypeError(f"`compile` must be true, false or a mapping of options, got {value!r}")
    known = {"backend", "mode", "dynamic", "size_buckets", "recompile_limit", "options"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown `compile` option(s) {unknown}; choose from {sorted(known)}")
    kwargs = dict(value)
    extra = kwargs.pop("options", None) or {}
    if not isinstance(extra, Mapping):
        raise TypeError(f"`compile.options` must be a mapping of inductor options, got {extra!r}")
    return CompileOptions(**kwargs, extra=dict(extra))


def padded_side(side: int, divisor: int, buckets: int | Sequence[int] | None = None) -> int:
    """``side`` padded up to a multiple of ``divisor``, then up to its size bucket (see :class:`CompileOptions`).

    Example:
        >>> padded_side(500, 32), padded_side(500, 32, 256), padded_side(500, 32, [512, 800, 1344])
        (512, 512, 512)
        >>> padded_side(801, 32, 256), padded_side(801, 32, [512, 800, 1344])
        (1024, 1344)
    """
    side = -(-int(side) // divisor) * divisor
    if buckets is None:
        return side
    if isinstance(buckets, int):
        return -(-side // buckets) * buckets
    return next((b for b in sorted(buckets) if b >= side), side)


def compile_module(module: nn.Module, options: CompileOptions) -> nn.Module:
    """Compile ``module`` in place (``nn.Module.compile``: its parameters and state-dict keys are unchanged)."""
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, options.recompile_limit)
    kwargs: dict[str, Any] = {"backend": options.backend, "dynamic": options.dynamic}
    if options.backend == "inductor":  # torch.compile takes a mode or options, not both
        if options.mode != "default" and not options.extra:
            kwargs["mode"] = options.mode
        else:
            kwargs["options"] = {**INDUCTOR_OPTIONS, **options.extra}
    module.compile(**kwargs)
    return module
