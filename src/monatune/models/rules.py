"""Which modules of a model the methods know: blocks, leaf layers, and the base (non-adapter) parts."""
from __future__ import annotations

from typing import Iterator, Sequence

from torch import nn

from .base import SLOTS, TunedBlockMixin
from .generic import POINTS_ATTR
from .leaf import LEAF_RULES
from .registry import BLOCK_RULES, BlockRule, block_rule, supported_families

__all__ = [
    "BLOCK_RULES",
    "LEAF_RULES",
    "find_blocks",
    "block_dim",
    "base_modules",
    "base_parameters",
    "tuned_rule",
    "leaf_type",
    "rule_of",
    "supported_families",
]


def tuned_rule(module: nn.Module) -> type[nn.Module] | None:
    """The tuned class to swap onto ``module`` (None if it already is one or has no rule)."""
    if isinstance(module, TunedBlockMixin):
        return None
    rule = block_rule(module)
    return rule.tuned if rule is not None else LEAF_RULES.get(type(module))


def rule_of(block: nn.Module) -> BlockRule:
    """The block rule of a block :func:`find_blocks` returned."""
    rule = block_rule(block)
    assert rule is not None, type(block)
    return rule


def leaf_type(module: nn.Module) -> type[nn.Module] | None:
    """The plain layer class of a (possibly already tuned) leaf module, if it has a leaf rule."""
    cls = type(module)
    if isinstance(module, TunedBlockMixin):
        cls = next((base for base in cls.__bases__ if base in LEAF_RULES), cls)
    return cls if cls in LEAF_RULES else None


def _is_block(module: nn.Module) -> bool:
    return block_rule(module) is not None


def base_modules(model: nn.Module, exclude: Sequence[str] = ()) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the model itself: not adapters, not the modules named in ``exclude`` (the head)."""
    skip = set(exclude)

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        yield prefix, module
        for name, child in module._modules.items():
            if child is None:
                continue
            if (isinstance(module, TunedBlockMixin) and name in SLOTS) or (module is model and name == POINTS_ATTR):
                continue  # an adapter bank
            full = f"{prefix}.{name}" if prefix else name
            if full not in skip:
                yield from walk(full, child)

    yield from walk("", model)


def base_parameters(model: nn.Module, exclude: Sequence[str] = ()) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of the model itself, without adapters and the modules in ``exclude``."""
    for mname, module in base_modules(model, exclude):
        for pname, param in module._parameters.items():
            if param is not None:
                yield (f"{mname}.{pname}" if mname else pname), param


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks monatune has rules for, in forward order."""
    blocks = [(name, m) for name, m in base_modules(model) if _is_block(m)]
    if not blocks:
        raise ValueError(
            f"monatune has no block rules for {type(model).__name__}: it knows {supported_families()}. For other "
            "models, put Mona after modules whose output is a feature map with "
            "`targets=<regex of module names>` (and `layout='NCHW'` or 'NHWC'), or use a method that needs no "
            "blocks (full, fixed, bitfit, norm, ssf)"
        )
    by_rule: dict[int, tuple[BlockRule, list[nn.Module]]] = {}
    for _, block in blocks:
        rule = rule_of(block)
        by_rule.setdefault(id(rule), (rule, []))[1].append(block)
    for rule, members in by_rule.values():  # refuse blocks a rule cannot tune here, before anything changes
        if rule.check is not None:
            rule.check(model, members)
    return blocks


def block_dim(block: nn.Module) -> int:
    """Width of a block's stream where its slots are."""
    return rule_of(block).width(block)
