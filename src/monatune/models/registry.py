"""The table of backbone families monatune knows: per block class, where the slots are and how the
stream maps to a grid; per model class, how to build its dense-prediction backbone.

Adding a family is one file under ``models/`` that defines the tuned block (a subclass whose
forward calls the slots, see :mod:`monatune.models.base`) and registers it::

    register_block(BlockRule(
        block=ConvNeXtBlock, tuned=TunedConvNeXtBlock, family="timm ConvNeXt",
        slots=("after_block",), grid="NCHW map", width=lambda b: b.conv_dw.out_channels,
        linears={"fc1": "mlp.fc1", "fc2": "mlp.fc2"},
    ))

and one row in :data:`FAMILY_MODULES` (timm families) or :data:`OPTIONAL_FAMILIES` (models from
other packages, whose file is imported only once that package is). Methods read the rule:
a slot method (Mona, adapter, AdaptFormer, LoRand) fills the slots the rule lists, LoRA finds the
projections in ``linears`` (``qkv``: one fused projection in q, k, v order), VPT needs the
``prompt`` slot, and ``partial-1`` counts the blocks.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from torch import nn

__all__ = [
    "BlockRule",
    "DenseRule",
    "BLOCK_RULES",
    "DENSE_RULES",
    "register_block",
    "register_dense",
    "block_rule",
    "dense_rule",
    "supported_families",
    "FAMILY_MODULES",
    "OPTIONAL_FAMILIES",
    "first_linear_width",
]


def first_linear_width(block: nn.Module) -> int:
    """Width of a transformer block's residual stream: its first linear layer's input."""
    return next(m for m in block.modules() if isinstance(m, nn.Linear)).in_features


@dataclass(frozen=True)
class BlockRule:
    """Where the methods go in one block class.

    Attributes:
        block: The package's block class (matched exactly: a subclass may have another forward).
        tuned: The subclass swapped onto it, whose forward calls the slots.
        family: Name shown to users (``"timm Swin V2"``).
        slots: The slots ``tuned`` calls (from :data:`monatune.models.base.BLOCK_SLOTS`).
        grid: How the stream at the slots maps to a grid, for the docs and errors (``"NHWC map"``,
            ``"NCHW map"``, ``"tokens: prefix + H x W"``, ...).
        width: The stream's width at the slots.
        linears: LoRA's projections: name (``qkv`` fused, or ``q``/``k``/``v``, ``proj``, ``fc1``,
            ``fc2``) -> path inside the block. Missing names are projections the block lacks.
        attach: Called once per apply with the model and the newly tuned blocks of this rule, after
            their classes are swapped (e.g. to share the current token grid with them).
        detach: Undoes ``attach`` on the model when no block of this rule is tuned any more.
        check: Called with the model and its blocks of this rule when a method plans its placement,
            before anything changes; raises ValueError for blocks the rule cannot tune there (a CLIP
            text tower's blocks, ViT blocks without a patch embedding around them).
    """

    block: type[nn.Module]
    tuned: type[nn.Module]
    family: str
    slots: tuple[str, ...]
    grid: str
    width: Callable[[nn.Module], int] = first_linear_width
    linears: Mapping[str, str] = field(default_factory=dict)
    attach: Callable[[nn.Module, Sequence[nn.Module]], None] | None = None
    detach: Callable[[nn.Module], None] | None = None
    check: Callable[[nn.Module, Sequence[nn.Module]], None] | None = None


@dataclass(frozen=True)
class DenseRule:
    """How to turn a model of one family into a dense backbone (see :mod:`monatune.models.dense`).

    Attributes:
        family: Name shown to users.
        timm_modules: The timm modules whose models this rule builds (``"swin_transformer_v2"``).
        build: ``build(name, out_indices, model_kwargs) -> model``: a model whose forward returns
            ``{"0": map, ...}`` (NCHW) with ``out_channels``, ``strides`` and ``out_indices`` set.
        hierarchical: Its maps are stages at several strides (Swin, ConvNeXt, ...) that feed an FPN
            or UperNet directly; otherwise (plain ViTs) one stride and the simple feature pyramid
            builds the scales from the last map.
    """

    family: str
    timm_modules: tuple[str, ...]
    build: Callable[[str, Sequence[int] | None, dict[str, Any]], nn.Module]
    hierarchical: bool


BLOCK_RULES: dict[type[nn.Module], BlockRule] = {}
_TUNED: dict[type[nn.Module], BlockRule] = {}
DENSE_RULES: list[DenseRule] = []

#: The family files of timm models (imported with monatune).
FAMILY_MODULES = ("swin", "swin_v2", "vit", "sam_vit", "hiera", "convnets")
#: Family files for other packages' models: package -> monatune module, imported once the package is.
OPTIONAL_FAMILIES: dict[str, str] = {
    "segment_anything": "segment_anything_sam",
    "sam2": "sam2_hiera",
    "transformers": "hf",
    "open_clip": "open_clip_tower",
}
_loaded: set[str] = set()


def register_block(rule: BlockRule) -> BlockRule:
    """Add ``rule`` to the table (a later rule for the same class replaces it)."""
    assert issubclass(rule.tuned, rule.block), (rule.tuned, rule.block)
    BLOCK_RULES[rule.block] = rule
    _TUNED[rule.tuned] = rule
    return rule


def register_dense(rule: DenseRule) -> DenseRule:
    DENSE_RULES.append(rule)
    return rule


def _load_families() -> None:
    """Import the family files: timm's always, another package's once that package is imported (a
    model of it can exist only then, and importing e.g. transformers costs seconds)."""
    for name in FAMILY_MODULES:
        if name not in _loaded:
            _loaded.add(name)
            importlib.import_module(f"{__package__}.{name}")
    for package, name in OPTIONAL_FAMILIES.items():
        if name not in _loaded and package in sys.modules:
            _loaded.add(name)
            importlib.import_module(f"{__package__}.{name}")


def block_rule(module: nn.Module) -> BlockRule | None:
    """The rule for ``module`` (plain or already tuned), or None if it is not a known block."""
    cls = type(module)
    rule = _TUNED.get(cls) or BLOCK_RULES.get(cls)
    if rule is None:
        _load_families()
        rule = _TUNED.get(cls) or BLOCK_RULES.get(cls)
    return rule


def dense_rule(timm_name: str) -> DenseRule | None:
    """The dense rule for a timm model name, or None."""
    import timm

    _load_families()
    for rule in DENSE_RULES:
        if timm.models.is_model_in_modules(timm_name, list(rule.timm_modules)):
            return rule
    return None


def supported_families(dense: bool = False) -> str:
    """The families known, for error messages."""
    _load_families()
    names = [r.family for r in DENSE_RULES] if dense else list(dict.fromkeys(r.family for r in BLOCK_RULES.values()))
    return ", ".join(names)
