"""Mona after any module whose output is a feature map, chosen by a name pattern.

For backbones monatune has no block rules for (ConvNeXt, ResNet, ...), or to add adapters
at other places: ``monatune.apply(model, "mona", targets=r"stages\\.\\d+", layout="NCHW")``
puts one adapter after every module whose qualified name fully matches the pattern. The
adapter runs in a forward hook on that module, so the module and its keys are untouched.

The adapters live in one ``nn.ModuleDict`` on the model, ``monatune_points``, keyed by the
target's name with dots written as ``__`` (``stages.2`` -> ``monatune_points.stages__2``),
each an ``nn.ModuleDict`` of adapters by name, like the block slots.
"""
from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

__all__ = ["MapHook", "POINTS_ATTR", "point_key"]

POINTS_ATTR = "monatune_points"
Layout = Literal["NCHW", "NHWC"]


def point_key(module_name: str) -> str:
    return module_name.replace(".", "__")


class MapHook:
    """Forward hook that passes a module's output through the active adapter of its point."""

    def __init__(self, adapters: nn.ModuleDict, module_name: str, layout: Layout, dim: int) -> None:
        self.adapters = adapters
        self.module_name = module_name
        self.layout = layout
        self.dim = dim
        self.active_adapter: str | None = None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.active_adapter not in self.adapters:
            return output
        if not isinstance(output, Tensor) or output.ndim != 4:
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"Mona after '{self.module_name}' needs a 4-d feature map output, got {got}")
        channels = output.shape[1] if self.layout == "NCHW" else output.shape[-1]
        if channels != self.dim:
            raise ValueError(
                f"Mona after '{self.module_name}' was built for {self.dim} channels but the output "
                f"{tuple(output.shape)} has {channels} in {self.layout} layout; is `layout` right?"
            )
        adapter = self.adapters[self.active_adapter]
        if self.layout == "NCHW":  # permute() views only: no copy, the result keeps channels-last strides
            return adapter(output.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return adapter(output)


def infer_channels(model: nn.Module, name: str, module: nn.Module) -> int | None:
    """Output channels of ``module``: from timm's ``feature_info`` if listed, else its last layer."""
    for info in getattr(model, "feature_info", None) or []:
        if isinstance(info, dict) and info.get("module") == name:
            return int(info["num_chs"])
    for sub in reversed(list(module.modules())):
        for attr in ("out_channels", "out_features", "num_features", "normalized_shape"):
            value = getattr(sub, attr, None)
            if isinstance(value, int):
                return value
            if isinstance(value, tuple) and len(value) == 1:
                return int(value[0])
    return None
