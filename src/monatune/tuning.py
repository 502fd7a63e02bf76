"""Put adapters into a backbone, decide what trains, and manage several named adapters.

:func:`apply` asks the method where its modules go (block slots, linear layers) and which
of the model's own weights it trains, then fills the slots and freezes the rest.
:func:`unapply` undoes all of it exactly. The bookkeeping lives in ``model._monatune_state``.

Several adapters, one backbone. Each :func:`apply` with a new ``adapter_name`` adds an
adapter; one is active (it runs and trains), :func:`set_active_adapter` switches,
:func:`disable_adapters` turns all off, :func:`remove_adapter` deletes one. Methods that
train the model's own weights in place (bitfit, norm, partial-1, and every adapter's head)
keep a copy of the frozen values of just those weights; switching away from an adapter
puts its trained values aside and the frozen ones back, so the backbone exists once.
``full`` changes every weight and cannot share a backbone.

Merging. LoRA and SSF are linear in the weights: :func:`merge_adapter` folds the active
one into the weights it modifies (no extra cost at inference), :func:`unmerge_adapter`
restores those weights exactly from a copy taken at merge time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .methods import METHODS, Placement, resolve_method
from .models.base import SLOTS, TunedBlockMixin, swap_class
from .models.generic import POINTS_ATTR, MapHook, infer_channels, point_key
from .models.registry import BLOCK_RULES, BlockRule, block_rule, supported_families
from .models.rules import tuned_rule

__all__ = [
    "apply",
    "unapply",
    "remove_adapter",
    "set_active_adapter",
    "disable_adapters",
    "active_adapter",
    "list_adapters",
    "merge_adapter",
    "unmerge_adapter",
    "get_state",
    "adapter_modules",
    "is_tuned",
    "TuningState",
    "AdapterSpec",
    "supported_families",
    "model_name",
    "classifier_names",
]

STATE_ATTR = "_monatune_state"


@dataclass
class AdapterSpec:
    """One named adapter: which method, with which options, where."""

    method: str
    options: dict[str, Any]
    targets: str | None = None  # regex of modules hooked, or None for the method's own placement
    layout: str = "NCHW"  # layout of the hooked modules' outputs
    base_params: list[str] = field(default_factory=list)  # the model's own weights it trains in place
    merged: bool = False


@dataclass
class TuningState:
    adapters: dict[str, AdapterSpec]
    active: str | None
    head: list[str]
    original_requires_grad: dict[str, bool]
    swapped: list[str] = field(default_factory=list)  # modules whose class apply() swapped
    attached: list[str] = field(default_factory=list)  # families whose rule.attach ran (token grids, ...)
    pristine: dict[str, Tensor] = field(default_factory=dict)  # frozen values of weights trained in place
    stash: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # in-place values of inactive adapters
    merge_backup: dict[str, Tensor | None] = field(default_factory=dict)  # weights before a merge (None: added)
    attrs_changed: list[tuple[str, str, Any]] = field(default_factory=list)  # (module, attribute, old value)


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
    """Add a tuning method to ``model`` in place and freeze what the method does not train.

    Args:
        model: A timm model (Swin, ViT family, EVA) or a dense backbone from
            :func:`monatune.build_dense_backbone`; with ``targets``, or for methods that need
            no blocks (full, fixed, bitfit, norm, ssf), any model.
        method: Method name, see ``monatune.METHODS`` (``"mona"``, ``"lora"``, ``"bitfit"``, ...).
        head: Modules that stay fully trainable: ``"auto"`` (the timm classifier, if the
            model has one with parameters), a module name, a list of names, or None. Set
            by the first adapter; later adapters on the same model share it.
        targets: For Mona only: instead of the block rules, a regex; an adapter goes after
            every module whose qualified name fully matches it. Their outputs must be 4-d maps.
        layout: Layout of the targets' outputs, ``"NCHW"`` or ``"NHWC"``.
        dim: Channels of the targets' outputs, if they cannot be read off the model.
        adapter_name: Name of this adapter (several can share one backbone). The first
            adapter of a model becomes active; later ones are activated with
            :func:`set_active_adapter`.
        **options: The method's options, e.g. ``bottleneck=64`` for Mona, ``rank=8`` for LoRA.

    Returns:
        ``model``, now tuned.

    Example:
        >>> import timm, monatune
        >>> model = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10)
        >>> monatune.apply(model, "mona")   # Mona in every block; the classifier trains
        >>> monatune.apply(model, "lora", adapter_name="lora", rank=8)
        >>> monatune.set_active_adapter(model, "lora")
    """
    spec = resolve_method(method, options)
    cls = type(spec)
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"`layout` must be 'NCHW' or 'NHWC', got {layout!r}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"`adapter_name` must be a non-empty string without dots, got {adapter_name!r}")
    state = get_state(model)
    if state is not None:
        if adapter_name in state.adapters:
            raise ValueError(f"the model already has an adapter named {adapter_name!r}; choose another `adapter_name`")
        if cls.exclusive or any(METHODS[a.method].exclusive for a in state.adapters.values()):
            raise ValueError(
                "full fine-tuning changes every weight, so it cannot share a backbone with other adapters; "
                f"the model has {sorted(state.adapters)}. Use a fresh model"
            )
    heads = _resolve_head(model, head) if state is None else state.head

    # Plan and build everything before touching the model, so a failure changes nothing.
    placements: list[Placement] = []
    base_params: list[str] = []
    if targets is not None:
        if not cls.point_adapter:
            raise ValueError(f"`targets=` places map adapters after modules (mona); {method!r} has its own placement")
        if isinstance(model, (nn.Sequential, nn.ModuleList)):
            raise ValueError("with `targets`, the model must not be an nn.Sequential (adapters would join the sequence)")
        planned_points = []
        for name, module in _match_targets(model, targets):
            channels = dim or infer_channels(model, name, module)
            if channels is None:
                raise ValueError(f"cannot tell the output channels of '{name}'; pass `dim=`")
            planned_points.append((name, module, channels, spec.build(channels)))
    else:
        placements = spec.placements(model, heads)
        base_params = spec.base_params(model, heads)
        for p in placements:
            host = model.get_submodule(p.host)
            if not isinstance(host, TunedBlockMixin) and tuned_rule(host) is None:
                raise ValueError(f"{method}: monatune cannot put adapters into '{p.host}' ({type(host).__name__})")

    if state is None:
        state = TuningState(
            adapters={},
            active=adapter_name,
            head=heads,
            original_requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        )
        model.__dict__[STATE_ATTR] = state
    state.adapters[adapter_name] = AdapterSpec(method, spec.to_dict(), targets, layout, base_params)
    if not cls.exclusive:
        params = dict(model.named_parameters())
        for name in base_params + _head_params(model, state):
            if name not in state.pristine:
                state.pristine[name] = _snapshot(params[name])

    attach: dict[str, tuple[BlockRule, list[nn.Module]]] = {}
    for p in placements:
        host = model.get_submodule(p.host)
        if p.host.endswith(".qkv"):
            _route_bias_through_qkv(model, state, p.host.rsplit(".", 1)[0])
        rule = tuned_rule(host)
        if rule is not None:
            swap_class(host, rule)
            state.swapped.append(p.host)
        if p.slot not in host._modules:
            host.add_module(p.slot, nn.ModuleDict())
        host._modules[p.slot][adapter_name] = p.module.train(host.training)
        block = block_rule(host)
        if block is not None and block.attach is not None:
            attach.setdefault(block.family, (block, []))[1].append(host)
    for family, (block, hosts) in attach.items():  # e.g. share the current token grid with the blocks
        block.attach(model, hosts)
        if family not in state.attached:
            state.attached.append(family)
    if targets is not None:
        if POINTS_ATTR not in model._modules:
            model.add_module(POINTS_ATTR, nn.ModuleDict())
        for name, module, channels, adapter in planned_points:
            key = point_key(name)
            bank = model._modules[POINTS_ATTR]
            if key not in bank:
                bank[key] = nn.ModuleDict()
                module.register_forward_hook(MapHook(bank[key], name, layout, channels))
            bank[key][adapter_name] = adapter.train(module.training)
    _sync(model, state)
    return model


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the adapter that runs and trains (and turn adapters back on after :func:`disable_adapters`)."""
    state = _require_state(model)
    if name not in state.adapters:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(state.adapters)}")
    _switch(model, state, name)


def disable_adapters(model: nn.Module) -> None:
    """Run the base model: no adapter runs, weights trained in place are back to their frozen values."""
    _switch(model, _require_state(model), None)


def active_adapter(model: nn.Module) -> str | None:
    """Name of the active adapter (None when disabled)."""
    return _require_state(model).active


def list_adapters(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every adapter by name: its method, options, and whether it is active and merged."""
    state = _require_state(model)
    return {
        name: {"method": spec.method, "options": dict(spec.options), "active": name == state.active, "merged": spec.merged}
        for name, spec in state.adapters.items()
    }


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


def merge_adapter(model: nn.Module) -> None:
    """Fold the active adapter into the weights it modifies (LoRA, SSF), for inference at no extra cost.

    Methods that train weights in place (bitfit, norm, partial-1, full, fixed) already are
    the weights: nothing to do. Others (mona, adapter, adaptformer, lorand, vpt) are not
    linear in the weights and raise.
    """
    state = _require_state(model)
    spec = _active_spec(state, "merge")
    cls = METHODS[spec.method]
    if spec.merged or cls.in_place:
        return
    if not cls.mergeable:
        mergeable = sorted(m for m, c in METHODS.items() if c.mergeable or c.in_place)
        raise ValueError(f"{spec.method} is not linear in the weights and cannot be merged; mergeable: {mergeable}")
    params = dict(model.named_parameters())
    for qualname, _, adapter in list(adapter_modules(model, state.active)):
        host_name = qualname.rsplit(".", 2)[0]
        host = model.get_submodule(host_name)
        for pname in ("weight", "bias"):
            key = _join(host_name, pname)
            if key not in state.merge_backup:
                state.merge_backup[key] = _snapshot(params[key]) if key in params else None
        adapter.merge_into(host)
        adapter.merged = True
    spec.merged = True
    _sync(model, state)


def unmerge_adapter(model: nn.Module) -> None:
    """Undo :func:`merge_adapter`: the weights it changed get their exact earlier values back."""
    state = _require_state(model)
    spec = _active_spec(state, "unmerge")
    if not spec.merged:
        return
    with torch.no_grad():
        for key, value in state.merge_backup.items():
            host_name, pname = key.rsplit(".", 1) if "." in key else ("", key)
            host = model.get_submodule(host_name)
            if value is None:
                setattr(host, pname, None)  # a bias the merge added
            else:
                getattr(host, pname).copy_(value)
    state.merge_backup.clear()
    for _, _, adapter in adapter_modules(model, state.active):
        adapter.merged = False
    spec.merged = False
    _sync(model, state)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete one named adapter; deleting the last one is :func:`unapply`."""
    state = _require_state(model)
    if name not in state.adapters:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(state.adapters)}")
    if len(state.adapters) == 1:
        unapply(model)
        return
    was_active = state.active == name
    if was_active:
        unmerge_adapter(model)
        _switch(model, state, None)
    for module in model.modules():
        for slot in SLOTS if isinstance(module, TunedBlockMixin) else ():
            bank = module._modules.get(slot)
            if bank is not None and name in bank:
                del bank[name]
    for bank in (model._modules.get(POINTS_ATTR) or {}).values():
        if name in bank:
            del bank[name]
    del state.adapters[name]
    state.stash.pop(name, None)
    needed = set(_head_params(model, state)).union(*(spec.base_params for spec in state.adapters.values()))
    for key in [k for k in state.pristine if k not in needed]:
        del state.pristine[key]
    _prune(model, state)
    if was_active:
        _switch(model, state, next(iter(state.adapters)))
    else:
        _sync(model, state)


def _prune(model: nn.Module, state: TuningState) -> None:
    """Undo what no remaining adapter uses: empty slots and point banks, swapped classes, hooks, the token grid.

    After ``apply(model, ..., adapter_name="b")`` and ``remove_adapter(model, "b")`` the model is as
    it was before, module classes included (a failed ``load_adapter`` relies on it).
    """
    swapped = set(state.swapped)
    for mname, module in list(model.named_modules()):
        if isinstance(module, TunedBlockMixin):
            for slot in SLOTS:
                bank = module._modules.get(slot)
                if bank is not None and len(bank) == 0:
                    del module._modules[slot]
            if mname in swapped and not any(slot in module._modules for slot in SLOTS):
                for attr in ("active_adapter", "_release_mask_cache", "token_grid"):
                    module.__dict__.pop(attr, None)
                module.__class__ = type(module).__bases__[0]
                state.swapped.remove(mname)
        for key in [k for k, hook in module._forward_hooks.items() if isinstance(hook, MapHook) and not len(hook.adapters)]:
            del module._forward_hooks[key]
    points = model._modules.get(POINTS_ATTR)
    if points is not None:
        for key in [k for k, bank in points.items() if not len(bank)]:
            del points[key]
        if not len(points):
            del model._modules[POINTS_ATTR]
    kept = []
    for module_name, attr, value in state.attrs_changed:  # the qkv bias routing of blocks no longer tuned
        if attr == "qkv_bias_separate" and f"{module_name}.qkv" not in state.swapped:
            setattr(model.get_submodule(module_name), attr, value)
        else:
            kept.append((module_name, attr, value))
    state.attrs_changed = kept
    _detach(model, state, keep=True)


def unapply(model: nn.Module, *, merge: bool = False) -> nn.Module:
    """Remove every adapter and give back the plain model.

    Args:
        model: A tuned model.
        merge: Keep the active adapter's effect: merge it (LoRA, SSF) and keep the weights
            it trained in place (bitfit, norm, partial-1, and the head). By default the model
            is restored exactly as it was before :func:`apply` (except after ``full``, which
            keeps no copy of the weights it trains).

    Returns:
        ``model``.
    """
    state = _require_state(model)
    if merge:
        if state.active is not None:
            merge_adapter(model)
    else:
        if state.active is not None:
            unmerge_adapter(model)
        if state.active is not None and not METHODS[state.adapters[state.active].method].exclusive:
            _switch(model, state, None)
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
    for module_name, attr, value in reversed(state.attrs_changed):
        setattr(model.get_submodule(module_name), attr, value)
    _detach(model, state, keep=False)
    for pname, param in model.named_parameters():
        param.requires_grad_(state.original_requires_grad.get(pname, True))
    del model.__dict__[STATE_ATTR]
    return model


def _detach(model: nn.Module, state: TuningState, *, keep: bool) -> None:
    """Run the ``detach`` of each family attached, unless (``keep``) a tuned block of that family remains."""
    rules = {rule.family: rule for rule in BLOCK_RULES.values()}
    tuned = {rule.family for m in model.modules() if keep and isinstance(m, TunedBlockMixin) and (rule := block_rule(m))}
    for family in [f for f in state.attached if f not in tuned]:
        detach = rules[family].detach
        if detach is not None:
            detach(model)
        state.attached.remove(family)


def refresh_pristine(model: nn.Module, names: Sequence[str]) -> None:
    """After new base weights were loaded into a tuned model, take them as the frozen values."""
    state = get_state(model)
    if state is None:
        return
    params = dict(model.named_parameters())
    for name in names:
        if name in state.pristine and name in params:
            state.pristine[name] = _snapshot(params[name])


# --------------------------------------------------------------------------- helpers


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _require_state(model: nn.Module) -> TuningState:
    state = get_state(model)
    if state is None:
        raise ValueError("the model has no monatune adapters; call monatune.apply(model, method) first")
    return state


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


def _route_bias_through_qkv(model: nn.Module, state: TuningState, attn_name: str) -> None:
    """EVA attention with separate q/v biases calls ``F.linear(x, qkv.weight, bias)``, never ``qkv``'s
    forward; its ``qkv_bias_separate`` path (``qkv(x) + bias``) computes the same and runs the tuned qkv."""
    attn = model.get_submodule(attn_name)
    if getattr(attn, "q_bias", None) is not None and getattr(attn, "qkv_bias_separate", None) is False:
        state.attrs_changed.append((attn_name, "qkv_bias_separate", False))
        attn.qkv_bias_separate = True


def _snapshot(t: Tensor) -> Tensor:
    """A detached copy, kept on the CPU (on the meta device for meta tensors)."""
    return t.detach().clone() if t.is_meta else t.detach().to("cpu", copy=True)


def _head_params(model: nn.Module, state: TuningState) -> list[str]:
    return [_join(h, n) for h in state.head for n, _ in model.get_submodule(h).named_parameters()]


def _in_place(model: nn.Module, state: TuningState, name: str) -> list[str]:
    """The model's own weights adapter ``name`` trains: its method's, and the head."""
    return state.adapters[name].base_params + _head_params(model, state)


def _active_spec(state: TuningState, action: str) -> AdapterSpec:
    if state.active is None:
        raise ValueError(f"adapters are disabled; set_active_adapter(model, name) before you {action}")
    return state.adapters[state.active]


@torch.no_grad()
def _switch(model: nn.Module, state: TuningState, new: str | None) -> None:
    """Make ``new`` active: put the outgoing adapter's in-place weights aside, bring the incoming one's back."""
    old = state.active
    if old != new and old is not None:
        spec = state.adapters[old]
        if spec.merged:
            raise ValueError(f"adapter {old!r} is merged into the weights; call unmerge_adapter(model) first")
        if METHODS[spec.method].exclusive:
            raise ValueError("full fine-tuning changed the weights themselves; there is no base model to switch to")
        params = dict(model.named_parameters())
        names = _in_place(model, state, old)
        state.stash[old] = {n: _snapshot(params[n]) for n in names}
        for n in names:
            params[n].copy_(state.pristine[n])
    state.active = new
    if old != new and new is not None:
        params = dict(model.named_parameters())
        for n, value in state.stash.pop(new, {}).items():
            params[n].copy_(value)
    _sync(model, state)


def _sync(model: nn.Module, state: TuningState) -> None:
    """Point every tuned module at the active adapter and set what trains."""
    for module in model.modules():
        if isinstance(module, TunedBlockMixin):
            module.active_adapter = state.active
        for hook in module._forward_hooks.values():
            if isinstance(hook, MapHook):
                hook.active_adapter = state.active
    model.requires_grad_(False)
    if state.active is not None:
        spec = state.adapters[state.active]
        if not spec.merged:
            for _, _, adapter in adapter_modules(model, state.active):
                adapter.requires_grad_(True)
        params = dict(model.named_parameters())
        for name in spec.base_params:
            params[name].requires_grad_(True)
        for name in state.head:
            model.get_submodule(name).requires_grad_(True)
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            frozen = not any(p.requires_grad for p in module.parameters())
            hooked = [k for k, hook in module._forward_pre_hooks.items() if hook is _keep_eval]
            if frozen and not hooked:
                module.register_forward_pre_hook(_keep_eval)
            elif not frozen:
                for key in hooked:
                    del module._forward_pre_hooks[key]
