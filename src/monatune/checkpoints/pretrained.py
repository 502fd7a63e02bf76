"""Load the checkpoints people already have into timm backbones and dense backbones.

One call, :func:`load_pretrained`, reads five formats, detected from the keys (or named
with ``format=``):

``official-swin``  Microsoft's Swin ``.pth`` (``{'model': state_dict}``, patch merging at the
                   end of a stage, ``head.``); converted by timm's own Swin checkpoint filter.
``timm``           timm ``.safetensors`` / ``.pth`` files; passed through timm's filter of
                   the model's family (position-embedding resampling and the like).
``mmlab``          OpenMMLab files (``{'state_dict': ..., 'meta': ...}``), ``backbone.`` prefix;
                   neck and head entries are skipped.
``mmlab-swin``     OpenMMLab's own Swin (mmseg / mmdet 2.x ``SwinTransformer``): the ImageNet
                   Swin files mmseg converted (``swin_base_patch4_window7_224_22k_20220317-
                   4f79f7c0.pth``, which the STAR-MMRotate configs load) and whole mmdet/mmrotate
                   detector checkpoints (``backbone.`` prefix; neck and head skipped). Names
                   ``patch_embed.projection``, ``stages.i.blocks.j.attn.w_msa.qkv``,
                   ``ffn.layers.0.0`` / ``ffn.layers.1``, ``stages.i.downsample`` (patch merging
                   at the end of stage i, its 4C inputs in ``nn.Unfold`` order); undone here
                   (:func:`mmlab_swin_to_official`), then timm's Swin filter as for ``official-swin``.
``release``        checkpoints trained with the Mona authors' release: ``mmlab`` with the two
                   Mona modules per block as ``my_module_1`` / ``my_module_2`` and output norms
                   ``norm0..3``; they load into a Mona-tuned :func:`build_dense_backbone`.

``.pth`` files are read with ``torch.load(weights_only=True)``. A file that needs arbitrary
unpickling is refused unless the caller passes ``allow_pickle=True``: unpickling can run
code embedded in the file. Nothing is changed in the model unless the whole file fits.
"""
from __future__ import annotations

import pickle
import pickletools
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..tuning import adapter_modules, classifier_names, get_state, model_name, refresh_pristine

__all__ = [
    "load_pretrained", "read_checkpoint", "read_state_dict", "mmlab_swin_to_official", "LoadReport", "FORMATS",
    "UnsafeCheckpointError",
]

FORMATS = ("auto", "official-swin", "timm", "mmlab", "mmlab-swin", "release")
SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")  # what a checkpoint file is called
_NOT_IN_DENSE = ("head.", "norm.", "fc_norm.", "head_drop.", "attn_pool.", "neck.", "fc.", "norm_pre.")  # classifiers, SAM's neck


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


def _directory_hint(path: Path) -> str:
    """What to give instead of the directory ``path``: the one checkpoint file in it, or the adapter it is."""
    from .adapter import CONFIG_NAME  # adapter_config.json

    if (path / CONFIG_NAME).is_file():
        return f"; it is a monatune adapter directory: load it with monatune.load_adapter(model, '{path}')"
    files = sorted(f for f in path.iterdir() if f.suffix in SUFFIXES and f.is_file())
    if len(files) == 1:
        return f"; it holds one: '{files[0]}'"
    more = ", ..." if len(files) > 5 else ""
    return f"; it holds {len(files)}: {', '.join(repr(f.name) for f in files[:5])}{more}" if files else ""


def _is_pickle(stream: IO[bytes]) -> bool:
    """Whether ``stream`` starts with a whole, balanced pickle: read with ``pickletools``, nothing is built or run."""
    mark, depth, marks = pickletools.markobject, 0, []
    try:
        for opcode, _, _ in pickletools.genops(stream):
            before = list(opcode.stack_before)
            if mark in before or (opcode.name == "POP" and marks and depth == marks[-1]):  # pops down to a MARK
                if not marks:
                    return False
                depth = marks.pop()
                before = before[: before.index(mark)] if mark in before else []
            if len(before) > depth:
                return False
            depth -= len(before)
            if mark in opcode.stack_after:
                marks.append(depth)
            else:
                depth += len(opcode.stack_after)
            if opcode.name == "STOP":
                return depth == 0 and not marks
    except Exception:  # genops raises ValueError, struct.error, UnicodeDecodeError, ... on bytes that are no pickle
        return False
    return False


def _holds_pickle(path: Path) -> bool:
    """Whether the file is a pickle, or a ``torch.save`` zip whose ``data.pkl`` is one."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"), None)
                if name is None:
                    return False
                with archive.open(name) as stream:
                    return _is_pickle(stream)
        except (zipfile.BadZipFile, OSError, EOFError):
            return False
    with path.open("rb") as stream:  # a plain pickle, or the legacy torch.save layout (a pickle first)
        return _is_pickle(stream)


def _torch_load(path: Path, allow_pickle: bool) -> Any:
    """``torch.load`` without running code in the file, unless ``allow_pickle``; every failure is a ``ValueError``.

    With ``weights_only``, torch's unpickler raises ``pickle.UnpicklingError`` for any opcode, global
    or call it does not allow ("Unsupported global", "unsupported GLOBAL ... is blocked", "Unsupported
    operand", "Trying to call reduce for unrecognized function", ...), and also for bytes that are no
    pickle at all. The two are told apart by reading the file with ``pickletools``, not by the wording.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=False)
    except pickle.UnpicklingError as e:
        if not allow_pickle and _holds_pickle(path):
            refers = re.search(r"GLOBAL (\S+)", str(e))  # the class or function it refused
            names = f" (it refers to {refers.group(1).rstrip('.')})" if refers else ""
            raise UnsafeCheckpointError(
                f"'{path}' contains Python objects besides tensors{names}, and reading them would unpickle the file, "
                "which can run any code stored in it. If you trust where the file came from, load it with "
                "allow_pickle=True (command line: --allow-pickle)."
            ) from None
        raise ValueError(f"'{path}' is not a readable PyTorch checkpoint (it does not unpickle)") from None
    except Exception as e:  # torch raises KeyError/IndexError/EOFError/RuntimeError for arbitrary bytes
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        reason = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
        raise ValueError(
            f"'{path}' is not a readable PyTorch checkpoint (torch.load could not read it: {reason})"
        ) from None


def read_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> Any:
    """Read a ``.safetensors`` file or a ``torch.save`` file without running code in it."""
    if not isinstance(allow_pickle, bool):  # a config's "false" is truthy: it would unpickle
        raise ValueError(f"`allow_pickle` must be True or False, got {allow_pickle!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"'{path}' is a directory; give a checkpoint file ({', '.join(SUFFIXES)}){_directory_hint(path)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file '{path}' does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"'{path}' is not a readable safetensors file ({e})") from None
    return _torch_load(path, allow_pickle)


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


# A key only OpenMMLab's Swin has (after an optional ``backbone.``): its attention, FFN or patch embedding.
_MMLAB_SWIN_KEY = re.compile(r"^(backbone\.)?(stages\.\d+\.blocks\.\d+\.(attn\.w_msa|ffn\.layers)\.|patch_embed\.projection\.)")


def _unfold_to_official(value: Tensor) -> Tensor:
    """Patch-merging weights from ``nn.Unfold`` channel order back to the official Swin order.

    The official ``PatchMerging`` concatenates the four 2x2 neighbours as [(0,0), (1,0), (0,1),
    (1,1)] blocks of C channels (timm does the same); OpenMMLab's unfolds them channel by channel
    in the order (0,0), (0,1), (1,0), (1,1). mmdet's ``swin_converter`` (``correct_unfold_*_order``)
    maps official -> unfold; this is its inverse (the neighbour permutation [0, 2, 1, 3] is its own).
    """
    if value.ndim == 2:  # reduction weight: out, 4C
        out, four_c = value.shape
        return value.reshape(out, four_c // 4, 4).transpose(1, 2)[:, [0, 2, 1, 3]].reshape(out, four_c)
    return value.reshape(-1, 4).t()[[0, 2, 1, 3]].reshape(-1)  # norm weight / bias: 4C


def mmlab_swin_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """OpenMMLab Swin names (``backbone.`` already removed) -> the official Swin layout.

    The inverse of mmdet's ``swin_converter`` / mmseg's ``swin2mmseg``: ``patch_embed.projection``
    -> ``patch_embed.proj``, ``stages`` -> ``layers``, ``attn.w_msa.`` -> ``attn.``,
    ``ffn.layers.0.0`` / ``ffn.layers.1`` -> ``mlp.fc1`` / ``mlp.fc2``, and the patch-merging
    (``downsample``) weights back to the official channel order. Other keys (output norms
    ``norm0..3``, a final ``norm``) keep their names.
    """
    out = {}
    for k, v in state_dict.items():
        if k.startswith("patch_embed.projection."):
            k = "patch_embed.proj." + k[len("patch_embed.projection."):]
        elif k.startswith("stages."):
            k = "layers." + k[len("stages."):]
            k = k.replace(".attn.w_msa.", ".attn.").replace(".ffn.layers.0.0.", ".mlp.fc1.").replace(".ffn.layers.1.", ".mlp.fc2.")
            if re.match(r"layers\.\d+\.downsample\.(reduction\.weight|norm\.(weight|bias))$", k):
                v = _unfold_to_official(v)
        out[k] = v
    return out


def detect_format(state_dict: Mapping[str, Tensor], mmlab: bool = False) -> str:
    keys = list(state_dict)
    if any(_MMLAB_SWIN_KEY.match(k) for k in keys):
        return "mmlab-swin"
    if any(".my_module_" in k or k.endswith(".qkv.lora_A") for k in keys):
        return "release"
    if mmlab or any(k.startswith("backbone.") for k in keys):
        return "mmlab"
    if "layers.0.downsample.reduction.weight" in state_dict:
        return "official-swin"
    return "timm"


def _family_filter(model: nn.Module) -> Callable[[dict, nn.Module], dict]:
    """timm's ``checkpoint_filter_fn`` of the model's family (it converts the original authors' files: official
    Swin, ConvNeXt, Hiera, ... to timm names), found from the timm class the model is or was swapped from."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("timm.models."):
            fn = getattr(sys.modules[cls.__module__], "checkpoint_filter_fn", None)
            if fn is not None:
                return fn
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
    if fmt in ("mmlab", "release") or (fmt == "mmlab-swin" and any(k.startswith("backbone.") for k in state_dict)):
        skipped = [k for k in state_dict if not k.startswith("backbone.")]
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    if fmt == "release":
        state_dict = _from_release(state_dict, model)
    if fmt == "mmlab-swin":
        state_dict = mmlab_swin_to_official(state_dict)  # timm's Swin filter below moves patch merging
    # timm's Swin filter looks up the module of every relative-position table; tables of blocks
    # the model lacks (a deeper checkpoint) go around it and are reported as not in the model.
    modules = dict(model.named_modules())
    stray = {k: v for k, v in state_dict.items() if k.endswith(".relative_position_bias_table") and k[:-29] not in modules}
    kept = {k: v for k, v in state_dict.items() if k not in stray}
    return {**_family_filter(model)(kept, model), **stray}, skipped


def _is_float(tensor: Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


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
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch nn.Module to load weights into, got {type(model).__name__}")
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
    if fmt == "mmlab-swin" and detected != "mmlab-swin":
        raise ValueError(
            f"'{path}' has no OpenMMLab Swin tensors (`stages.N.blocks.N.attn.w_msa.*`, `patch_embed.projection.*`), "
            f"so it is not an mmseg/mmdet Swin file; it looks like a {detected} file (load it with format='auto')"
        )
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
    # load_state_dict would copy int32 values into float weights (and truncate floats into integer
    # buffers) without a word; integer buffers such as relative_position_index are integer in both.
    kinds = [
        f"'{k}' is {str(usable[k].dtype).removeprefix('torch.')} in the file but "
        f"{str(t.dtype).removeprefix('torch.')} in the model"
        for k, t in target.items()  # in the model's order
        if k in usable and _is_float(usable[k]) != _is_float(t)
    ]
    if kinds:
        shown = "; ".join(kinds[:5]) + (f"; ... ({len(kinds)} in all)" if len(kinds) > 5 else "")
        raise ValueError(
            f"checkpoint '{path}' has integer tensors where {arch} has floating-point ones, or the reverse: {shown}. "
            "They would not convert without loss, so nothing was loaded; save the weights as floating point "
            "(is it a quantized or index file?)"
        )
    model.load_state_dict(usable, strict=False)
    refresh_pristine(model, list(usable))  # loaded base weights are the frozen values adapters return to
    report.loaded = sorted(usable)
    return report
