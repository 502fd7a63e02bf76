"""Weight-decay and learning-rate groups by mmcv 1.x's ``paramwise_cfg`` rule, the release's optimiser.

The release's configs build AdamW with mmcv's ``DefaultOptimizerConstructor``. Its rule, which no
library monatune depends on implements (timm's ``param_groups_weight_decay`` exempts every 1-D
parameter instead), for each trainable parameter of a module at ``prefix`` named ``name``:

1. ``custom_keys`` are tried longest first (ties alphabetically); the first key that is a
   substring of ``f"{prefix}.{name}"`` sets ``lr = base_lr * lr_mult`` and
   ``weight_decay = base_wd * decay_mult`` (each 1 when not given), and nothing else applies;
2. otherwise every parameter of a norm layer (BatchNorm, GroupNorm, LayerNorm, InstanceNorm) gets
   ``norm_decay_mult``; else every parameter of a depthwise convolution ``dwconv_decay_mult``;
   else a parameter named ``bias`` ``bias_decay_mult`` (each 1 when not given). So with the
   classification configs' ``bias_decay_mult=0`` a Mona's depthwise-convolution biases are still
   decayed, its projector's bias is not.

The names the rule sees are the release's: :meth:`~monatune.engine.TunedModule.release_name`
maps monatune's (the tuned backbone's parameters under ``backbone.``, a detector's FPN under
``neck.``, heads under the release's ``rpn_head.``, ``roi_head.``, ``bbox_head.``, ``decode_head.``,
``auxiliary_head.``). Within the backbone timm's Swin names are the release's, and Mona's LayerNorm
is named ``norm`` in both (``my_module_1.norm`` there), so substring keys decide alike; inside the
heads no name contains ``norm`` in either (the release's BatchNorms are ConvModule's ``bn``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["mmcv_param_groups", "check_paramwise"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_FIELDS = {"custom_keys", "norm_decay_mult", "bias_decay_mult", "dwconv_decay_mult"}


def check_paramwise(paramwise: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a ``paramwise_cfg``-like mapping and return it with ``custom_keys`` as dicts."""
    if unknown := set(paramwise) - _FIELDS:
        raise ValueError(f"unknown paramwise field(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
    keys = {}
    for key, value in dict(paramwise.get("custom_keys") or {}).items():
        if isinstance(value, (int, float)):
            value = {"decay_mult": float(value)}
        if not isinstance(value, Mapping) or set(value) - {"decay_mult", "lr_mult"}:
            raise ValueError(f"custom key {key!r} takes a number (decay_mult) or {{decay_mult, lr_mult}}, got {value!r}")
        keys[str(key)] = {k: float(v) for k, v in value.items()}
    out = dict(paramwise, custom_keys=keys)
    for field in ("norm_decay_mult", "bias_decay_mult", "dwconv_decay_mult"):
        out[field] = 1.0 if out.get(field) is None else float(out[field])
    return out


def mmcv_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    paramwise: Mapping[str, Any],
    name_of: Callable[[str], str] = lambda name: name,
) -> list[dict[str, Any]]:
    """AdamW parameter groups of ``model``'s trainable parameters by mmcv's rule (module docstring).

    Args:
        model: The network.
        lr: Base learning rate.
        weight_decay: Base weight decay.
        paramwise: ``custom_keys`` (key -> ``decay_mult`` number or ``{decay_mult, lr_mult}``),
            ``norm_decay_mult``, ``dwconv_decay_mult``, ``bias_decay_mult`` (absent: 1).
        name_of: Maps a parameter's name in ``model`` to the name the rule matches against.

    Returns:
        One group per distinct (lr, weight_decay), each with ``params``, ``lr``, ``weight_decay``
        and ``names`` (the matched names, for inspection).
    """
    rule = check_paramwise(paramwise)
    keys = rule["custom_keys"]
    ordered = sorted(sorted(keys), key=len, reverse=True)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        is_norm = isinstance(module, _NORMS)
        is_dwconv = isinstance(module, nn.Conv2d) and module.in_channels == module.groups
        for local, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = name_of(f"{prefix}.{local}")  # mmcv matches f"{prefix}.{name}" (".name" at the root)
            decay, lr_mult = 1.0, 1.0
            key = next((k for k in ordered if k in name), None)
            if key is not None:
                decay, lr_mult = keys[key].get("decay_mult", 1.0), keys[key].get("lr_mult", 1.0)
            elif is_norm:
                decay = rule["norm_decay_mult"]
            elif is_dwconv:
                decay = rule["dwconv_decay_mult"]
            elif local == "bias":
                decay = rule["bias_decay_mult"]
            group = groups.setdefault(
                (lr * lr_mult, weight_decay * decay),
                {"params": [], "names": [], "lr": lr * lr_mult, "weight_decay": weight_decay * decay},
            )
            group["params"].append(param)
            group["names"].append(name)
    return list(groups.values())
