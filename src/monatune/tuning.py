"""Put adapters into a backbone and decide what trains.

:func:`apply` finds the blocks it knows (timm Swin, ViT/DeiT/DINOv2, EVA) and fills their
adapter slots, or, with ``targets=``, hooks an adapter after every module whose name
matches. Then it freezes everything except the adapters and the head named by the caller.
:func:`unapply` undoes all of it exactly. The bookkeeping lives in ``model._monatune_state``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from timm.models.eva import EvaBlock
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .methods import resolve_method
from .models.base import SLOTS, TunedBlockMixin, swap_class
from .models.generic import POINTS_ATTR, MapHook, infer_channels, point_key
from .models.swin import TunedSwinBlock
from .models.vit import TunedEvaBlock, TunedViTBlock, attach_token_grid, detach_token_grid

__all__ = [
    "apply",
    "unapply",
    "remove_adapter",
    "set_active_adapter",
    "get_state",
    "adapter_modules",
    "is_tuned",
    "TuningState",
    "AdapterSpec",
    "SUPPORTED_BLOCKS",
    "model_name",
    "classifier_names",
]

STATE_ATTR = "_monatune_state"

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


@dataclass
class AdapterSpec:
    """One named adapter: which method, with which options, where."""

    method: str
    options: dict[str, Any]
    targets: str | None = None  # regex of modules hooked, or None for block slots
    layout: str = "NCHW"  # layout of the hooked modules' outputs


@dataclass
class TuningState:
    adapters: dict[str, AdapterSpec]
    active: str
    head: list[str]
    original_requires_grad: dict[str, bool]
    swapped: list[str] = field(default_factory=list)  # blocks whose class apply() swapped
    grid_attached: bool = False


def get_state(model: nn.Module) -> TuningState | None:
    return model.__dict__.get(STATE_ATTR)


def is_tuned(model: nn.Module) -> bool:
    return get_state(model) is not None


def apply(
    model: nn.Module,
    method: str = "mona",
    *,
    head: str | Sequence[str] | None = "auto",
    targets: str | None = None,
    layout: str = "NCHW",
    dim: int | None = None,
    adapter_name: str = "default",
    **options: Any,
) -> nn.Module:
    """Add a tuning method's adapters to ``model`` in place and freeze the rest.

    Args:
        model: A timm model (Swin, ViT family, EVA) or a :class:`monatune.DenseBackbone`;
            with ``targets``, any model.
        method: Method name, see ``monatune.METHODS``.
        head: Modules that stay fully trainable: ``"auto"`` (the timm classifier, if the
            model has one with parameters), a module name, a list of names, or None. Set
            by the first adapter; later adapters on the same model share it.
        targets: Instead of block rules, a regex; an adapter goes after every module whose
            qualified name fully matches it. Their outputs must be 4-d maps.
        layout: Layout of the targets' outputs, ``"NCHW"`` or ``"NHWC"``.
        dim: Channels of the targets' outputs, if they cannot be read off the model.
        adapter_name: Name of this adapter (several can share one backbone).
        **options: The method's options, e.g. ``bottleneck=64`` for Mona.

    Returns:
        ``model``, now tuned.

    Example:
        >>> import timm, monatune
        >>> model = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10)
        >>> monatune.apply(model, "mona")   # Mona in every block; the classifier trains
        >>> convnext = timm.create_model("convnext_tiny", num_classes=10)
        >>> monatune.apply(convnext, "mona", targets=r"stages\\.\\d+")
    """
    spec = resolve_method(method, options)
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"`layout` must be 'NCHW' or 'NHWC', got {layout!r}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"`adapter_name` must be a non-empty string without dots, got {adapter_name!r}")
    state = get_state(model)
    if state is not None and adapter_name in state.adapters:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; choose another `adapter_name`")
    heads = _resolve_head(model, head) if state is None else state.head

    # Plan and build everything before touching the model, so a failure changes nothing.
    if targets is not None and isinstance(model, (nn.Sequential, nn.ModuleList)):
        raise ValueError("with `targets`, the model must not be an nn.Sequential (adapters would join the sequence)")
    if targets is None:
        blocks = _find_blocks(model)
        planned = [(name, block, {slot: spec.build(_block_dim(block)) for slot in spec.slots}) for name, block in blocks]
    else:
        points = _match_targets(model, targets)
        planned_points = []
        for name, module in points:
            channels = dim or infer_channels(model, name, module)
            if channels is None:
                raise ValueError(f"cannot tell the output channels of '{name}'; pass `dim=`")
            planned_points.append((name, module, channels, spec.build(channels)))

    if state is None:
        state = TuningState(
            adapters={},
            active=adapter_name,
            head=heads,
            original_requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        )
        model.__dict__[STATE_ATTR] = state
    state.adapters[adapter_name] = AdapterSpec(method, spec.to_dict(), targets, layout)

    if targets is None:
        token_blocks = []
        for name, block, slots in planned:
            if type(block) in BLOCK_RULES:
                swap_class(block, BLOCK_RULES[type(block)])
                state.swapped.append(name)
            for slot, adapter in slots.items():
                if slot not in block._modules:
                    block.add_module(slot, nn.ModuleDict())
                block._modules[slot][adapter_name] = adapter.train(block.training)
            if isinstance(block, (TunedViTBlock, TunedEvaBlock)):
                token_blocks.append(block)
        if token_blocks:
            state.grid_attached = state.grid_attached or getattr(model, "_monatune_grid", None) is None
            attach_token_grid(model, token_blocks)
    else:
        if POINTS_ATTR not in model._modules:
            model.add_module(POINTS_ATTR, nn.ModuleDict())
        for name, module, channels, adapter in planned_points:
            key = point_key(name)
            bank = model._modules[POINTS_ATTR]
            if key not in bank:
                bank[key] = nn.ModuleDict()
                module.register_forward_hook(MapHook(bank[key], name, layout, channels))
            bank[key][adapter_name] = adapter.train(module.training)
    set_active_adapter(model, state.active)
    return model


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the adapter that runs and trains."""
    state = _require_state(model)
    if name not in state.adapters:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(state.adapters)}")
    state.active = name
    for module in model.modules():
        if isinstance(module, TunedBlockMixin):
            module.active_adapter = name
        for hook in module._forward_hooks.values():
            if isinstance(hook, MapHook):
                hook.active_adapter = name
    _refresh_trainable(model, state)


def adapter_modules(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, str, nn.Module]]:
    """Yield (qualified name, adapter name, module) for every adapter, or those named ``name``."""
    for mname, module in model.named_modules():
        if isinstance(module, TunedBlockMixin):
            for slot in SLOTS:
                bank = module._modules.get(slot)
                for aname, adapter in (bank.items() if bank is not None else ()):
                    if name is None or aname == name:
                        yield _join(mname, slot, aname), aname, adapter
    points = model._modules.get(POINTS_ATTR)
    for key, bank in (points.items() if points is not None else ()):
        for aname, adapter in bank.items():
            if name is None or aname == name:
                yield _join(POINTS_ATTR, key, aname), aname, adapter


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete one named adapter; deleting the last one is :func:`unapply`."""
    state = _require_state(model)
    if name not in state.adapters:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(state.adapters)}")
    if len(state.adapters) == 1:
        unapply(model)
        return
    for module in model.modules():
        for slot in SLOTS if isinstance(module, TunedBlockMixin) else ():
            bank = module._modules.get(slot)
            if bank is not None and name in bank:
                del bank[name]
    for bank in (model._modules.get(POINTS_ATTR) or {}).values():
        if name in bank:
            del bank[name]
    del state.adapters[name]
    if state.active == name:
        set_active_adapter(model, next(iter(state.adapters)))


def unapply(model: nn.Module) -> nn.Module:
    """Remove every adapter and restore the model as it was before :func:`apply`."""
    state = _require_state(model)
    swapped = set(state.swapped)
    for mname, module in list(model.named_modules()):
        if isinstance(module, TunedBlockMixin):
            for slot in SLOTS:
                module._modules.pop(slot, None)
            module.__dict__.pop("active_adapter", None)
            if mname in swapped:
                module.__dict__.pop("_release_mask_cache", None)
                module.__class__ = type(module).__bases__[0]
        for key in [k for k, hook in module._forward_hooks.items() if isinstance(hook, MapHook)]:
            del module._forward_hooks[key]
        for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _keep_eval]:
            del module._forward_pre_hooks[key]
    model._modules.pop(POINTS_ATTR, None)
    if state.grid_attached:
        detach_token_grid(model)
    for pname, param in model.named_parameters():
        param.requires_grad_(state.original_requires_grad.get(pname, True))
    del model.__dict__[STATE_ATTR]
    return model


# --------------------------------------------------------------------------- helpers


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _require_state(model: nn.Module) -> TuningState:
    state = get_state(model)
    if state is None:
        raise ValueError("the model has no monatune adapters; call monatune.apply(model, method) first")
    return state


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    blocks = [
        (name, m) for name, m in model.named_modules() if type(m) in BLOCK_RULES or isinstance(m, TunedBlockMixin)
    ]
    if not blocks:
        raise ValueError(
            f"monatune has no block rules for {type(model).__name__}: it knows {SUPPORTED_BLOCKS}. For other "
            "models, put adapters after modules whose output is a feature map with "
            "`targets=<regex of module names>` (and `layout='NCHW'` or 'NHWC')"
        )
    return blocks


def _block_dim(block: nn.Module) -> int:
    return next(m for m in block.modules() if isinstance(m, nn.Linear)).in_features


def _match_targets(model: nn.Module, targets: str) -> list[tuple[str, nn.Module]]:
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise ValueError(f"`targets` is not a valid regular expression: {targets!r} ({e})") from None
    matched = [(n, m) for n, m in model.named_modules() if n and pattern.fullmatch(n)]
    if not matched:
        names = [n for n, _ in model.named_children()]
        raise ValueError(
            f"`targets` pattern {targets!r} matched no module of {type(model).__name__}; "
            f"its top-level modules are {names} (the pattern must match a whole name, e.g. r'stages\\.\\d+')"
        )
    return matched


def _resolve_head(model: nn.Module, head: str | Sequence[str] | None) -> list[str]:
    if head is None:
        return []
    if head == "auto":
        return [n for n in classifier_names(model) if any(True for _ in model.get_submodule(n).parameters())]
    names = [head] if isinstance(head, str) else list(head)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        top = [n for n, _ in model.named_children()]
        raise ValueError(f"head module(s) {missing} not found in {type(model).__name__}; its top-level modules are {top}")
    return names


def model_name(model: nn.Module) -> str | None:
    """The architecture name: set by ``build_dense_backbone``, else timm's ``pretrained_cfg``."""
    return getattr(model, "model_name", None) or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")


def classifier_names(model: nn.Module) -> list[str]:
    """Names of the modules timm's ``get_classifier()`` returns (DeiT-distilled has two)."""
    get_classifier = getattr(model, "get_classifier", None)
    found = get_classifier() if callable(get_classifier) else None
    classifiers = list(found) if isinstance(found, (tuple, list)) else [found] if found is not None else []
    return [n for n, m in model.named_modules() if n and any(m is c for c in classifiers)]


def _keep_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: a frozen BatchNorm keeps its statistics even under model.train()."""
    module.training = False


def _refresh_trainable(model: nn.Module, state: TuningState) -> None:
    model.requires_grad_(False)
    for _, _, adapter in adapter_modules(model, state.active):
        adapter.requires_grad_(True)
    for name in state.head:
        model.get_submodule(name).requires_grad_(True)
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not any(p.requires_grad for p in module.parameters()):
            if _keep_eval not in module._forward_pre_hooks.values():
                module.register_forward_pre_hook(_keep_eval)
