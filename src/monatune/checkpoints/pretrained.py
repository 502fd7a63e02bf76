"""Load the checkpoints people already have into timm backbones and dense backbones.

One call, :func:`load_pretrained`, reads four formats, detected from the keys (or named
with ``format=``):

``official-swin``  Microsoft's Swin ``.pth`` (``{'model': state_dict}``, patch merging at the
                   end of a stage, ``head.``); converted by timm's own Swin checkpoint filter.
``timm``           timm ``.safetensors`` / ``.pth`` files; passed through timm's filter of
                   the model's family (position-embedding resampling and the like).
``mmlab``          OpenMMLab files (``{'state_dict': ..., 'meta': ...}``), ``backbone.`` prefix;
                   neck and head entries are skipped.
``release``        checkpoints trained with the Mona authors' release: ``mmlab`` with the two
                   Mona modules per block as ``my_module_1`` / ``my_module_2`` and output norms
                   ``norm0..3``; they load into a Mona-tuned :func:`build_dense_backbone`.

``.pth`` files are read with ``torch.load(weights_only=True)``. A file that needs arbitrary
unpickling is refused unless the caller passes ``allow_pickle=True``: unpickling can run
code embedded in the file. Nothing is changed in the model unless the whole file fits.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import eva, swin_transformer, vision_transformer
from torch import Tensor, nn

from ..tuning import adapter_modules, classifier_names, get_state, model_name, refresh_pristine

__all__ = ["load_pretrained", "read_checkpoint", "read_state_dict", "LoadReport", "FORMATS", "UnsafeCheckpointError"]

FORMATS = ("auto", "official-swin", "timm", "mmlab", "release")
_NOT_IN_DENSE = ("head.", "norm.", "fc_norm.", "head_drop.", "attn_pool.")  # classification-only parts


class UnsafeCheckpointError(ValueError):
    """The file holds Python objects that only a full (code-running) unpickle can read."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did."""

    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model tensors the file has no values for (allowed ones)
    skipped: list[str] = field(default_factory=list)  # file tensors not used (neck/head, classifier)

    def __str__(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors ({self.format}); {len(self.missing)} left as initialised, "
            f"{len(self.skipped)} in the file not used"
        )


def read_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> Any:
    """Read a ``.safetensors`` file or a ``torch.save`` file without running code in it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file '{path}' does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"'{path}' is not a readable safetensors file ({e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=False)
    except pickle.UnpicklingError as e:
        # weights_only refuses a class or function it does not know ("Unsupported global"); any
        # other unpickling failure means the bytes are not a pickle to begin with.
        if "allowed global" in str(e) or "Unsupported global" in str(e):
            raise UnsafeCheckpointError(
                f"'{path}' contains Python objects besides tensors, and reading them would unpickle the file, "
                "which can run any code stored in it. If you trust where the file came from, load it with "
                "allow_pickle=True (command line: --allow-pickle)."
            ) from None
        raise ValueError(f"'{path}' is not a PyTorch checkpoint (it does not unpickle)") from None
    except Exception as e:  # torch raises KeyError/IndexError/EOFError/RuntimeError for arbitrary bytes
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        reason = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
        raise ValueError(f"'{path}' is not a PyTorch checkpoint (torch.load could not read it: {reason})") from None


def read_state_dict(path: str | Path, *, allow_pickle: bool = False) -> tuple[dict[str, Tensor], bool]:
    """The state dict inside a checkpoint file, and whether it came wrapped with OpenMMLab ``meta``."""
    obj = read_checkpoint(path, allow_pickle=allow_pickle)
    mmlab = isinstance(obj, Mapping) and "meta" in obj
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"'{path}' holds no state dict (found {type(obj).__name__})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"'{path}' holds no tensors (top-level keys: {list(obj)[:8]})")
    tensors = {k[7:] if k.startswith("module.") else k: v for k, v in tensors.items()}  # DDP wrapper
    return tensors, mmlab


def detect_format(state_dict: Mapping[str, Tensor], mmlab: bool = False) -> str:
    keys = list(state_dict)
    if any(".my_module_" in k or k.endswith(".qkv.lora_A") for k in keys):
        return "release"
    if mmlab or any(k.startswith("backbone.") for k in keys):
        return "mmlab"
    if "layers.0.downsample.reduction.weight" in state_dict:
        return "official-swin"
    return "timm"


def _family_filter(model: nn.Module) -> Callable[[dict, nn.Module], dict]:
    if isinstance(model, swin_transformer.SwinTransformer):
        return swin_transformer.checkpoint_filter_fn
    if isinstance(model, vision_transformer.VisionTransformer):
        return vision_transformer.checkpoint_filter_fn
    if isinstance(model, eva.Eva):
        return eva.checkpoint_filter_fn
    return lambda sd, m: sd


#: Where the release keeps each method's modules (``my_module_1`` / ``my_module_2`` in every block).
RELEASE_SLOTS = {
    "mona": {"1": "after_attn", "2": "after_mlp"},
    "adapter": {"1": "attn_out", "2": "mlp_out"},
    "adaptformer": {"1": "mlp_parallel"},
}


def _from_release(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    state = get_state(model)
    method = state.adapters[state.active].method if state is not None and state.active else None
    if method not in (*RELEASE_SLOTS, "lora"):
        raise ValueError(
            "a checkpoint trained with the Mona release holds Mona, Adapter, AdaptFormer or LoRA modules; load it "
            "into a dense backbone tuned with that method: monatune.build_dense_backbone(<timm name>, <method>)"
        )
    name = state.active
    if method == "lora":  # loralib's MergedLinear keeps lora_A / lora_B on the qkv linear itself
        return {re.sub(r"\.qkv\.lora_([AB])$", rf".qkv.lora.{name}.lora_\1", k): v for k, v in state_dict.items()}
    slot = RELEASE_SLOTS[method]
    renamed = {}
    for k, v in state_dict.items():
        match = re.search(r"\.my_module_(\d)\.", k)
        if match and match.group(1) not in slot:
            raise ValueError(f"'{k}' has no place in a backbone tuned with {method}; is the checkpoint from another method?")
        renamed[re.sub(r"\.my_module_(\d)\.", lambda m: f".{slot[m.group(1)]}.{name}.", k)] = v
    return renamed


def convert_state_dict(
    state_dict: dict[str, Tensor], model: nn.Module, fmt: str
) -> tuple[dict[str, Tensor], list[str]]:
    """Map a file's tensors onto ``model``'s names; returns them and the skipped file keys."""
    skipped: list[str] = []
    if fmt in ("mmlab", "release"):
        skipped = [k for k in state_dict if not k.startswith("backbone.")]
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    if fmt == "release":
        state_dict = _from_release(state_dict, model)
    # timm's Swin filter looks up the module of every relative-position table; tables of blocks
    # the model lacks (a deeper checkpoint) go around it and are reported as not in the model.
    modules = dict(model.named_modules())
    stray = {k: v for k, v in state_dict.items() if k.endswith(".relative_position_bias_table") and k[:-29] not in modules}
    kept = {k: v for k, v in state_dict.items() if k not in stray}
    return {**_family_filter(model)(kept, model), **stray}, skipped


def load_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    format: str = "auto",
    allow_pickle: bool = False,
) -> LoadReport:
    """Load pretrained (or release-trained) weights from a file into ``model``.

    Tensors of the model the file may lack: the adapters (they start from their own init),
    the dense backbone's output norms, and the classifier. File tensors that may go unused:
    a classification head and final norm (for a dense backbone or another class count) and
    the neck/heads of an OpenMMLab file. Anything else that does not match is an error that
    names the file and the first mismatching tensors, and the model is left as it was.

    Args:
        model: A timm model or :func:`monatune.build_dense_backbone` result, tuned or not.
        path: The checkpoint file.
        format: One of ``FORMATS``; ``"auto"`` detects it from the keys.
        allow_pickle: Allow a full unpickle for files that need it (runs code in the file).

    Returns:
        A :class:`LoadReport`.

    Example:
        >>> backbone = monatune.build_dense_backbone("swin_base_patch4_window7_224", "mona")
        >>> monatune.load_pretrained(backbone, "swin_base_patch4_window7_224_22k.pth")
    """
    if format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; choose from {FORMATS}")
    raw, mmlab = read_state_dict(path, allow_pickle=allow_pickle)
    detected = detect_format(raw, mmlab)
    fmt = detected if format == "auto" else format
    if fmt == "release" and detected != "release":
        raise ValueError(
            f"'{path}' has no adapter tensors (`my_module_1` / `my_module_2`, `qkv.lora_A`), so it is not a checkpoint "
            f"trained with the Mona release; it looks like a {detected} file (load it with format='auto')"
        )
    if fmt == "mmlab" and not any(k.startswith("backbone.") for k in raw):
        raise ValueError(f"'{path}' has no `backbone.` tensors, so it is not an OpenMMLab detector/segmentor file")
    arch = model_name(model) or type(model).__name__
    try:
        converted, skipped = convert_state_dict(raw, model, fmt)
    except (KeyError, AttributeError, RuntimeError, IndexError) as e:  # timm's filters assume a fitting file
        raise ValueError(
            f"checkpoint '{path}' ({fmt} format) does not fit {arch}: converting it failed ({e}). Is it a "
            "checkpoint of another architecture or size (say Swin-L for a Swin-B model)?"
        ) from None

    target = model.state_dict()
    adapter_prefixes = tuple(f"{q}." for q, _, _ in adapter_modules(model))
    head_prefixes = tuple(f"{n}." for n in classifier_names(model))
    optional = adapter_prefixes + head_prefixes + tuple(f"norm{i}." for i in range(len(getattr(model, "out_channels", ()))))

    report = LoadReport(format=fmt, skipped=skipped)
    problems: list[str] = []
    for key, value in converted.items():
        if key not in target:
            if key.startswith(_NOT_IN_DENSE):
                report.skipped.append(key)
            else:
                problems.append(f"'{key}' is in the file but not in the model")
        elif tuple(value.shape) != tuple(target[key].shape):
            if key.startswith(head_prefixes):
                report.skipped.append(key)  # a classifier for another number of classes
            else:
                in_file = tuple(raw[key].shape) if key in raw else tuple(value.shape)  # before timm's resampling
                problems.append(f"'{key}' has shape {in_file} in the file but {tuple(target[key].shape)} in the model")
    for key in target:
        if key not in converted or key in report.skipped:
            if key.startswith(optional):
                report.missing.append(key)
            elif key not in converted:
                problems.append(f"'{key}' is in the model but not in the file")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} mismatches in all)" if len(problems) > 5 else "")
        raise ValueError(
            f"checkpoint '{path}' ({fmt} format) does not fit {arch}: {shown}. Is it a checkpoint of another "
            "architecture or size (say Swin-L for a Swin-B model)?"
        )
    usable = {k: v for k, v in converted.items() if k in target and k not in report.skipped}
    model.load_state_dict(usable, strict=False)
    refresh_pristine(model, list(usable))  # loaded base weights are the frozen values adapters return to
    report.loaded = sorted(usable)
    return report
