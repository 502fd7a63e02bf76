"""Memory options for a frozen backbone: recompute instead of store, low precision for the frozen part.

A Mona-tuned backbone needs no weight gradients and no optimizer state for its frozen
weights, and PyTorch already keeps only what an input-gradient-only backward needs (a frozen
``nn.Linear`` saves its weight, not its input). What remains are the activations the frozen
operations must keep to pass gradients down to the adapters. Two options shrink them:

- :func:`set_activation_checkpointing`: timm's gradient checkpointing of the blocks (with
  non-reentrant ``torch.utils.checkpoint``): a block keeps only its input and is run again
  in backward. The recomputation restores the random state, so dropout and drop-path draw
  the same masks: outputs and gradients are those of the plain run. Costs about one more
  forward pass of the backbone.
- :func:`set_frozen_precision`: the frozen part runs under autocast in bfloat16 or float16,
  and the frozen weights of its linear and convolution layers are stored in that type
  (half the memory). Every module with trainable parameters (the adapters, the task head,
  trained norms) runs in float32 with autocast off, so its weights, their gradients and the
  optimizer state stay float32. This changes results by low-precision rounding of the
  frozen part (as mixed-precision training does) and is off by default.

Example:
    >>> model = timm.create_model("swin_base_patch4_window7_224")
    >>> monatune.apply(model, "mona")
    >>> set_activation_checkpointing(model)
    >>> set_frozen_precision(model, torch.bfloat16)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["set_activation_checkpointing", "set_frozen_precision", "frozen_precision"]

_HOOKS_ATTR = "_monatune_precision_hooks"
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _checkpointable(model: nn.Module) -> list[nn.Module]:
    """The outermost modules offering timm's ``set_grad_checkpointing``."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if callable(getattr(module, "set_grad_checkpointing", None)):
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return found


def set_activation_checkpointing(model: nn.Module, enable: bool = True) -> int:
    """Recompute the backbone's blocks in backward instead of storing their activations.

    Uses timm's ``set_grad_checkpointing`` on every timm backbone in ``model`` (the model
    itself, or the backbone inside a detector or segmenter). Returns how many were set.
    """
    targets = _checkpointable(model)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} contains no timm backbone with gradient checkpointing "
            "(`set_grad_checkpointing`); activation checkpointing needs one"
        )
    for module in targets:
        module.set_grad_checkpointing(enable)
    return len(targets)


def frozen_precision(model: nn.Module) -> torch.dtype | None:
    """The low-precision type the frozen part of ``model`` runs in, or None."""
    state = getattr(model, _HOOKS_ATTR, None)
    return state["dtype"] if state else None


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float32(v) for v in value)
    return value


def _first_device_type(args: tuple, kwargs: dict) -> str:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


def _autocast_hooks(module: nn.Module, dtype: torch.dtype | None) -> list[Any]:
    """Hooks that run ``module`` under autocast to ``dtype`` (None: autocast off, inputs to float32)."""
    stack: list[torch.autocast] = []

    def enter(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        device_type = _first_device_type(args, kwargs)
        if dtype is None:
            ctx = torch.autocast(device_type, enabled=False)
            args, kwargs = _to_float32(args), {k: _to_float32(v) for k, v in kwargs.items()}
        else:
            ctx = torch.autocast(device_type, dtype=dtype)
        ctx.__enter__()
        stack.append(ctx)
        return args, kwargs

    def leave(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if stack:
            stack.pop().__exit__(None, None, None)

    return [
        module.register_forward_pre_hook(enter, with_kwargs=True),
        module.register_forward_hook(leave, with_kwargs=True, always_call=True),
    ]


def _trainable_islands(model: nn.Module) -> list[nn.Module]:
    """The outermost modules that hold trainable parameters directly or are adapters."""
    from .tuning import adapter_modules, is_tuned

    adapters = {id(m) for _, _, m in adapter_modules(model)} if is_tuned(model) else set()
    islands: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        own = any(p.requires_grad for p in module.parameters(recurse=False))
        if id(module) in adapters or own:
            islands.append(module)
            return
        for child in module.children():
            visit(child)

    for child in model.children():
        visit(child)
    if any(p.requires_grad for p in model.parameters(recurse=False)):
        raise ValueError(f"{type(model).__name__} holds trainable parameters directly; wrap it in a module")
    return islands


def set_frozen_precision(model: nn.Module, dtype: torch.dtype | str | None) -> None:
    """Run the frozen part of ``model`` in ``dtype`` (bfloat16 or float16); None turns it off.

    Call after the method is applied (``monatune.apply``), since it decides what is frozen.
    The frozen linear and convolution weights are cast to ``dtype``; turning the option off
    casts them back to float32 (their values stay rounded to ``dtype``).
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown frozen precision {dtype!r}; choose from {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"frozen precision must be torch.bfloat16 or torch.float16 (or None), got {dtype}")
    state = getattr(model, _HOOKS_ATTR, None)
    if state:
        for handle in state["hooks"]:
            handle.remove()
        _cast_frozen(model, torch.float32)
        delattr(model, _HOOKS_ATTR)
    if dtype is None:
        return
    if not any(not p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no frozen parameters (full fine-tuning?); frozen precision needs a frozen part")
    islands = _trainable_islands(model)
    hooks = _autocast_hooks(model, dtype)
    for island in islands:
        hooks += _autocast_hooks(island, None)
    _cast_frozen(model, dtype)
    setattr(model, _HOOKS_ATTR, {"dtype": dtype, "hooks": hooks})


def _cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen weights of linear and convolution layers (autocast's operations) to ``dtype``."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad and param.is_floating_point():
                    param.data = param.data.to(dtype)
