"""Which modules of a model the methods know: blocks, leaf layers, and the base (non-adapter) parts."""
from __future__ import annotations

from typing import Iterator, Sequence

from timm.models.eva import EvaBlock
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from .base import SLOTS, TunedBlockMixin
from .generic import POINTS_ATTR
from .leaf import LEAF_RULES
from .swin import TunedSwinBlock
from .vit import TunedEvaBlock, TunedViTBlock

__all__ = [
    "BLOCK_RULES",
    "LEAF_RULES",
    "SUPPORTED_BLOCKS",
    "find_blocks",
    "block_dim",
    "base_modules",
    "base_parameters",
    "tuned_rule",
    "leaf_type",
]

#: timm block class -> tuned subclass swapped in. Exact types only: a subclass may have a
#: different forward, which the tuned class would silently replace.
BLOCK_RULES: dict[type[nn.Module], type[nn.Module]] = {
    SwinTransformerBlock: TunedSwinBlock,
    Block: TunedViTBlock,
    EvaBlock: TunedEvaBlock,
}
SUPPORTED_BLOCKS = (
    "timm Swin v1 (swin_transformer.SwinTransformerBlock), "
    "timm ViT / DeiT / DINOv2 (vision_transformer.Block), timm EVA (eva.EvaBlock)"
)


def tuned_rule(module: nn.Module) -> type[nn.Module] | None:
    """The tuned class to swap onto ``module`` (None if it already is one or has no rule)."""
    if isinstance(module, TunedBlockMixin):
        return None
    return BLOCK_RULES.get(type(module)) or LEAF_RULES.get(type(module))


def leaf_type(module: nn.Module) -> type[nn.Module] | None:
    """The plain layer class of a (possibly already tuned) leaf module, if it has a leaf rule."""
    cls = type(module)
    if isinstance(module, TunedBlockMixin):
        cls = next((base for base in cls.__bases__ if base in LEAF_RULES), cls)
    return cls if cls in LEAF_RULES else None


def _is_block(module: nn.Module) -> bool:
    return type(module) in BLOCK_RULES or isinstance(module, tuple(BLOCK_RULES.values()))


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
            f"monatune has no block rules for {type(model).__name__}: it knows {SUPPORTED_BLOCKS}. For other "
            "models, put Mona after modules whose output is a feature map with "
            "`targets=<regex of module names>` (and `layout='NCHW'` or 'NHWC'), or use a method that needs no "
            "blocks (full, fixed, bitfit, norm, ssf)"
        )
    return blocks


def block_dim(block: nn.Module) -> int:
    """Width of a block's residual stream."""
    return next(m for m in block.modules() if isinstance(m, nn.Linear)).in_features
