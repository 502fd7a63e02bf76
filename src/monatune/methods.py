"""Tuning methods by name: each is an options dataclass that says where its modules go and what trains.

``METHODS`` maps the name given to :func:`monatune.apply` (and ``--method`` on the command
line) to its options class. Each option is declared with what it accepts (``option(default,
Check)``) and checked in ``__post_init__``, before any model is touched. A method answers two
questions about a model:

- :meth:`MethodOptions.placements`: which adapter modules to put in which slot of which
  block or layer (see :mod:`monatune.models.base` for the slots);
- :meth:`MethodOptions.base_params`: which of the model's own parameters it trains in place.

The head named at :func:`monatune.apply` always trains. Spec section 4 lists what each
method trains in the release; option names are shared across methods (``bottleneck``,
``dropout``, ``rank``, ``scale``). Defaults are the Mona release's (Leiyi-Hu/mona); the
STAR-MMRotate fork's Swin backbones differ in two ways an option reaches: adapter linears keep
PyTorch's init (``init="default"`` for mona, adapter, adaptformer) and LoRand has 4 branches with
a kernel per projection (``branches=4, shared_kernel=False``).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

from timm.layers import RmsNorm
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .adapters.bottleneck import INITS, Bottleneck
from .adapters.lora import LoRA
from .adapters.lorand import LoRand
from .adapters.mona import Mona
from .adapters.ssf import SSF
from .adapters.vpt import Prompt, PromptCarry
from .models.rules import base_modules, base_parameters, block_dim, find_blocks, leaf_type, rule_of

__all__ = ["METHODS", "MethodOptions", "Placement", "resolve_method"]

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, _BatchNorm, RmsNorm)


# ---------------------------------------------------------------- what each option accepts


@dataclass(frozen=True)
class Check:
    """What an option accepts: ``allowed`` is said in the error; ``convert`` gives the value kept or raises."""

    allowed: str
    convert: Callable[[Any], Any]

    def __call__(self, method: str, name: str, value: Any) -> Any:
        try:
            return self.convert(value)
        except (TypeError, ValueError):
            raise ValueError(f"{method} option `{name}` must be {self.allowed}, got {value!r}") from None


def option(default: Any, check: Check) -> Any:
    """A method option: its default and what it accepts (checked when the options are made)."""
    return field(default=default, metadata={"check": check})


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError
    return int(value)


def _probability(value: Any) -> float:  # a dropout rate
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError
    return float(value)


def _finite(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError
    return value


def _odd_sizes(value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError
    sizes = tuple(_positive_int(k) for k in value)
    if any(k % 2 == 0 for k in sizes):
        raise ValueError
    return sizes


def _init(value: Any) -> str:
    if value not in INITS:
        raise ValueError
    return value


POSITIVE_INT = Check("a positive int", _positive_int)
DROPOUT = Check("a number in [0, 1)", _probability)
#: How an adapter's linears start: the Mona release's init routine, or PyTorch's default (STAR-MMRotate).
INIT = Check(f"one of {', '.join(repr(i) for i in INITS)}", _init)
BOOL = Check("true or false", _bool)


def _drop_path_side(value: Any) -> str:
    if value not in ("inside", "outside"):
        raise ValueError
    return value


#: Where a branch adapter sits relative to the block's DropPath: Adapter(DropPath(y)) is STAR-MMRotate's.
DROP_PATH_SIDE = Check("'inside' (DropPath(adapter(branch)), the Mona release) or 'outside' (adapter(DropPath(branch)), "
                       "STAR-MMRotate)", _drop_path_side)


def _after_drop_path(module: nn.Module, side: str) -> nn.Module:
    module.after_drop_path = side == "outside"  # read by the blocks (TunedBlockMixin._branch)
    return module


@dataclass
class Placement:
    """One adapter module to add: ``host`` (module name) gets it in ``slot``."""

    host: str
    slot: str
    module: nn.Module


@dataclass
class MethodOptions:
    """Base of every method's options."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    #: Linear in the weights: can be folded into them for inference (``merge_adapter``).
    mergeable: ClassVar[bool] = False
    #: Trains the model's own weights in place (nothing to merge: they already are the weights).
    in_place: ClassVar[bool] = False
    #: Changes every weight: keeps no copy of the base, so it cannot share a backbone.
    exclusive: ClassVar[bool] = False
    #: Can go after any module of a model with ``targets=`` (a map-to-map adapter).
    point_adapter: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # each option as its `option(..., Check)` says; see `resolve_method`
            setattr(self, f.name, f.metadata["check"](self.name, f.name, getattr(self, f.name)))

    def placements(self, model: nn.Module, head: Sequence[str]) -> list[Placement]:
        return []

    def base_params(self, model: nn.Module, head: Sequence[str]) -> list[str]:
        return []

    def build(self, dim: int) -> nn.Module:
        raise ValueError(f"`targets=` places map adapters (mona); {self.name!r} goes where its method says")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# ---------------------------------------------------------------- methods that train the model's own weights


@dataclass
class FullOptions(MethodOptions):
    """Full fine-tuning: every parameter trains."""

    name: ClassVar[str] = "full"
    paper: ClassVar[str] = "baseline"
    in_place: ClassVar[bool] = True
    exclusive: ClassVar[bool] = True

    def base_params(self, model: nn.Module, head: Sequence[str]) -> list[str]:
        return [n for n, _ in base_parameters(model, head)]


@dataclass
class FixedOptions(MethodOptions):
    """Frozen backbone: only the head trains (a linear probe for classification)."""

    name: ClassVar[str] = "fixed"
    paper: ClassVar[str] = "baseline"
    in_place: ClassVar[bool] = True


@dataclass
class BitFitOptions(MethodOptions):
    """Every parameter whose name contains ``bias`` (with Swin's relative-position bias tables)."""

    name: ClassVar[str] = "bitfit"
    paper: ClassVar[str] = 'BitFit (Ben Zaken et al., ACL 2022)'
    in_place: ClassVar[bool] = True

    def base_params(self, model: nn.Module, head: Sequence[str]) -> list[str]:
        return [n for n, _ in base_parameters(model, head) if "bias" in n]


@dataclass
class NormOptions(MethodOptions):
    """Norm-tuning: every parameter of every normalisation layer."""

    name: ClassVar[str] = "norm"
    paper: ClassVar[str] = "norm-tuning"
    in_place: ClassVar[bool] = True

    def base_params(self, model: nn.Module, head: Sequence[str]) -> list[str]:
        return [
            f"{mname}.{pname}" if mname else pname
            for mname, module in base_modules(model, head)
            if isinstance(module, NORM_TYPES)
            for pname, p in module._parameters.items()
            if p is not None
        ]


@dataclass
class PartialOptions(MethodOptions):
    """Partial-k: the last ``blocks`` transformer blocks train (partial-1: the last block of the last stage)."""

    name: ClassVar[str] = "partial-1"
    paper: ClassVar[str] = "Partial-k (Yosinski et al., NeurIPS 2014)"
    in_place: ClassVar[bool] = True

    blocks: int = option(1, POSITIVE_INT)  # how many of the last blocks train

    def base_params(self, model: nn.Module, head: Sequence[str]) -> list[str]:
        blocks = find_blocks(model)
        if self.blocks > len(blocks):
            raise ValueError(f"`blocks` is {self.blocks} but the model has only {len(blocks)} blocks")
        prefixes = tuple(f"{name}." for name, _ in blocks[-self.blocks :])
        return [n for n, _ in base_parameters(model, head) if n.startswith(prefixes)]


# ---------------------------------------------------------------- methods that add modules to blocks


@dataclass
class _SlotOptions(MethodOptions):
    slots: ClassVar[tuple[str, ...]] = ()

    def placements(self, model: nn.Module, head: Sequence[str]) -> list[Placement]:
        """One module in each of the method's slots that the block has (a block with none of them is an error)."""
        placed = []
        for name, block in find_blocks(model):
            rule = rule_of(block)
            slots = [slot for slot in self.slots if slot in rule.slots]
            if not slots:
                raise ValueError(
                    f"{self.name} goes in the {', '.join(self.slots)} slot(s), which {rule.family} blocks do not have "
                    f"(they have {', '.join(rule.slots)}); see the README's table of families and methods"
                )
            placed += [Placement(name, slot, self.build(block_dim(block))) for slot in slots]
        return placed


@dataclass
class MonaOptions(_SlotOptions):
    """Mona: one adapter after each residual add of every block (after the block, for convolutional blocks)."""

    name: ClassVar[str] = "mona"
    paper: ClassVar[str] = "Mona (Yin et al., CVPR 2025)"
    point_adapter: ClassVar[bool] = True
    slots: ClassVar[tuple[str, ...]] = ("after_attn", "after_mlp", "after_block")

    bottleneck: int = option(64, POSITIVE_INT)  # width of the bottleneck
    kernel_sizes: tuple[int, ...] = option(  # averaged depthwise kernels (odd)
        (3, 5, 7), Check("a non-empty list of positive odd ints, e.g. [3, 5, 7] (one kernel: [3])", _odd_sizes)
    )
    dropout: float = option(0.1, DROPOUT)  # before the up-projection
    init: str = option("trunc_normal", INIT)  # project1/2: "trunc_normal" (std 0.02, Mona release) or "default" (STAR)

    def build(self, dim: int) -> nn.Module:
        return Mona(dim, bottleneck=self.bottleneck, kernel_sizes=self.kernel_sizes, dropout=self.dropout, init=self.init)


@dataclass
class AdapterOptions(_SlotOptions):
    """Houlsby adapter on the attention and MLP outputs, inside DropPath."""

    name: ClassVar[str] = "adapter"
    paper: ClassVar[str] = "Adapter (Houlsby et al., ICML 2019)"
    slots: ClassVar[tuple[str, ...]] = ("attn_out", "mlp_out")

    bottleneck: int = option(64, POSITIVE_INT)  # hidden width
    dropout: float = option(0.1, DROPOUT)  # before the up-projection
    init: str = option("trunc_normal", INIT)  # linears: "trunc_normal" (std 0.02, Mona release) or "default" (STAR)
    drop_path: str = option("inside", DROP_PATH_SIDE)  # DropPath(adapter(branch)), or adapter(DropPath(branch)) (STAR)

    def build(self, dim: int) -> nn.Module:
        return _after_drop_path(Bottleneck(dim, self.bottleneck, self.dropout, init=self.init), self.drop_path)


@dataclass
class AdaptFormerOptions(_SlotOptions):
    """AdaptFormer: a scaled bottleneck parallel to the MLP, fed the stream before LN2."""

    name: ClassVar[str] = "adaptformer"
    paper: ClassVar[str] = "AdaptFormer (Chen et al., NeurIPS 2022)"
    slots: ClassVar[tuple[str, ...]] = ("mlp_parallel",)

    bottleneck: int = option(64, POSITIVE_INT)  # hidden width
    dropout: float = option(0.1, DROPOUT)  # before the up-projection
    scale: float = option(0.1, Check("a finite number", _finite))  # factor on the branch
    init: str = option("trunc_normal", INIT)  # linears: "trunc_normal" (std 0.02, Mona release) or "default" (STAR)

    def build(self, dim: int) -> nn.Module:
        return Bottleneck(dim, self.bottleneck, self.dropout, scale=self.scale, residual=False, init=self.init)


@dataclass
class LoRandOptions(_SlotOptions):
    """LoRand: low-rank-product adapters on the attention and MLP outputs (see ``adapters/lorand.py``)."""

    name: ClassVar[str] = "lorand"
    paper: ClassVar[str] = "LoRand (Yin et al., CVPR 2023)"
    slots: ClassVar[tuple[str, ...]] = ("attn_out", "mlp_out")

    bottleneck: int | None = option(  # hidden width; None: half the block width
        None, Check("a positive int, or null for half the block width", lambda v: None if v is None else _positive_int(v))
    )
    rank: int = option(8, POSITIVE_INT)  # size of each branch's kernel (beta)
    branches: int = option(2, POSITIVE_INT)  # low-rank products per projection (alpha)
    shared_kernel: bool = option(True, BOOL)  # one kernel per branch for both projections; False: one each (STAR)
    drop_path: str = option("inside", DROP_PATH_SIDE)  # DropPath(adapter(branch)), or adapter(DropPath(branch)) (STAR)

    def build(self, dim: int) -> nn.Module:
        lorand = LoRand(dim, self.bottleneck, rank=self.rank, branches=self.branches, shared_kernel=self.shared_kernel)
        return _after_drop_path(lorand, self.drop_path)


@dataclass
class VPTOptions(MethodOptions):
    """Visual prompt tuning, deep (prompts in every block) or shallow (in the first)."""

    name: ClassVar[str] = "vpt"
    paper: ClassVar[str] = "VPT (Jia et al., ECCV 2022)"

    num_tokens: int = option(10, POSITIVE_INT)  # prompts per block (deep) or in all (shallow)
    deep: bool = option(True, BOOL)  # new prompts in every block, or only before the first
    dropout: float = option(0.0, DROPOUT)  # on the prompts

    def placements(self, model: nn.Module, head: Sequence[str]) -> list[Placement]:
        blocks = find_blocks(model)
        for _, block in blocks:
            rule = rule_of(block)
            if "prompt" not in rule.slots:
                raise ValueError(f"vpt needs tokens that can be prepended, which {rule.family} blocks do not take "
                                 f"({rule.grid}); see the README's table of families and methods")
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
        area = int(patch[0] * patch[1]) if isinstance(patch, (tuple, list)) else int(patch) ** 2
        carry = None if self.deep else PromptCarry()
        placed = []
        for i, (name, block) in enumerate(blocks):
            prompt = Prompt(
                block_dim(block),
                self.num_tokens,
                self.dropout,
                learned=self.deep or i == 0,
                carry=carry,
                last=i == len(blocks) - 1,
                patch_area=area,
            )
            if carry is not None and i > 0 and name.endswith(".0") and isinstance(block, SwinTransformerBlock):
                downsample = getattr(model.get_submodule(name.rsplit(".", 2)[0]), "downsample", None)  # the stage's
                if downsample is not None and not isinstance(downsample, nn.Identity):
                    prompt.__dict__["merge_layer"] = downsample
            placed.append(Placement(name, "prompt", prompt))
        return placed


# ---------------------------------------------------------------- methods on linear layers


_LORA_MODULES = ("q", "k", "v", "proj", "fc1", "fc2")


def _lora_modules(value: Any) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value)  # a non-iterable raises TypeError
    if not names or any(m not in _LORA_MODULES for m in names):
        raise ValueError
    return names


@dataclass
class LoRAOptions(MethodOptions):
    """LoRA on the query and value slices of the fused qkv projection (release: rank 64, alpha 1)."""

    name: ClassVar[str] = "lora"
    paper: ClassVar[str] = "LoRA (Hu et al., ICLR 2022)"
    mergeable: ClassVar[bool] = True

    rank: int = option(64, POSITIVE_INT)  # rank of each update
    alpha: float = option(1.0, Check("a finite number", _finite))  # the update is scaled by alpha / rank
    dropout: float = option(0.0, DROPOUT)  # on the LoRA input
    modules: tuple[str, ...] = option(  # which projections: q, k, v, proj (attention out), fc1, fc2
        ("q", "v"), Check(f"a non-empty subset of {_LORA_MODULES}", _lora_modules)
    )

    def placements(self, model: nn.Module, head: Sequence[str]) -> list[Placement]:
        placed = []
        qkv_slices = [i for i, m in enumerate("qkv") if m in self.modules]
        for name, block in find_blocks(model):
            rule = rule_of(block)
            fused = _linear_at(block, rule.linears.get("qkv"))
            wanted = [m for m in self.modules if m not in "qkv" or fused is None]
            missing = [m for m in wanted if _linear_at(block, rule.linears.get(m)) is None]
            if missing:
                have = [m for m in _LORA_MODULES if _linear_at(block, rule.linears.get(m)) is not None or
                        (m in "qkv" and fused is not None)]  # fmt: skip
                if not have:
                    raise ValueError(f"lora adapts linear projections, which {rule.family} blocks "
                                     f"({type(block).__name__}) do not have; see the README's table of families and "
                                     "methods")  # fmt: skip
                raise ValueError(f"lora: {rule.family} blocks have no {', '.join(missing)} projection; choose "
                                 f"`modules` from {have}")  # fmt: skip
            if qkv_slices and fused is not None:
                placed.append(Placement(f"{name}.{rule.linears['qkv']}", "lora", self._lora(fused, 3, qkv_slices)))
            for m in wanted:
                path = rule.linears[m]
                placed.append(Placement(f"{name}.{path}", "lora", self._lora(block.get_submodule(path))))
        return placed

    def _lora(self, linear: nn.Module, num_slices: int = 1, slices: Sequence[int] = (0,)) -> LoRA:
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"lora needs linear layers, found {type(linear).__name__}")
        return LoRA(linear.in_features, linear.out_features, self.rank, self.alpha, self.dropout, num_slices, slices)


@dataclass
class SSFOptions(MethodOptions):
    """SSF: scale and shift after every linear, LayerNorm and the patch-embedding convolution."""

    name: ClassVar[str] = "ssf"
    paper: ClassVar[str] = "SSF (Lian et al., NeurIPS 2022)"
    mergeable: ClassVar[bool] = True

    def placements(self, model: nn.Module, head: Sequence[str]) -> list[Placement]:
        placed = []
        for name, module in base_modules(model, head):
            if leaf_type(module) is None:
                continue
            if isinstance(module, nn.Conv2d):
                placed.append(Placement(name, "ssf", SSF(module.out_channels, channel_dim=1)))
            elif isinstance(module, nn.Linear):
                placed.append(Placement(name, "ssf", SSF(module.out_features)))
            elif module.weight is not None:  # LayerNorm with an affine to merge into
                placed.append(Placement(name, "ssf", SSF(module.normalized_shape[-1])))
        if not placed:
            raise ValueError(f"ssf found no linear, LayerNorm or Conv2d layer in {type(model).__name__}")
        return placed


def _linear_at(block: nn.Module, path: str | None) -> nn.Linear | None:
    """The linear layer at ``path`` in ``block`` (None if there is none: no such path, or another layer type)."""
    if path is None:
        return None
    try:
        module = block.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


METHODS: dict[str, type[MethodOptions]] = {
    cls.name: cls
    for cls in (
        FullOptions,
        FixedOptions,
        BitFitOptions,
        NormOptions,
        PartialOptions,
        AdapterOptions,
        LoRAOptions,
        AdaptFormerOptions,
        LoRandOptions,
        SSFOptions,
        VPTOptions,
        MonaOptions,
    )
}


def resolve_method(method: str, options: Mapping[str, Any] | None = None) -> MethodOptions:
    """Options object for ``method``; ``ValueError`` for an unknown name or option, or a value it does not take."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown tuning method {method!r}; supported: {', '.join(METHODS)}")
    cls = METHODS[method]
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"options of method {method!r} must be a mapping of option names to values, got {options!r}")
    options = dict(options or {})
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted((k for k in options if k not in allowed), key=str)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; its options are {allowed or 'none'}")
    return cls(**options)
