"""Adapter-only checkpoints: the trainable parts of a tuned model, nothing of the frozen base.

A checkpoint is a directory (the layout Hugging Face PEFT uses)::

    my-adapter/
      adapter_config.json          method, options, placement, backbone name, head names,
                                   fingerprint of the frozen base weights, weights' sha256
      adapter_model.safetensors    adapter tensors (+ head, + any trained base tensors)

Tensor names are the model's own with the adapter's name left out
(``layers.0.blocks.0.after_attn.project1.weight``), so a file does not depend on the name
it was saved under. The config also lists the model's blocks in forward order (``blocks``: name,
family, width), so a model of the same architecture from another package, whose blocks have
other names (a transformers ``SwinModel`` for a timm Swin), loads the block adapters by position. A save writes a new directory beside the old one and swaps it in
(:mod:`monatune.atomic`), so an interrupted save never leaves a half-written or mixed adapter
where a good one was; the config records the weights' hash (and any extra file's), so a config
never silently pairs with other weights.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

from .._version import __version__
from ..atomic import recover_directory, replace_directory, staging_directory
from ..methods import resolve_method
from ..models.base import BLOCK_SLOTS
from ..models.rules import block_dim, find_blocks, rule_of
from ..tuning import adapter_modules, apply, get_state, model_name, remove_adapter, set_active_adapter

__all__ = [
    "save_adapter", "load_adapter", "read_adapter", "read_adapter_file", "adapter_state_dict", "base_fingerprint",
    "CONFIG_NAME", "WEIGHTS_NAME",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "monatune-adapter"
FORMAT_VERSION = 1


def _file_key(model_key: str, qualname: str) -> str:
    """``layers.0.blocks.0.after_attn.default.x`` -> ``layers.0.blocks.0.after_attn.x``."""
    return qualname.rsplit(".", 1)[0] + model_key[len(qualname):]


def _saved_keys(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """File key -> model key for everything an adapter checkpoint holds."""
    keys: dict[str, str] = {}
    for qualname, _, module in adapter_modules(model, adapter_name):
        for k in module.state_dict():
            model_key = f"{qualname}.{k}"
            keys[_file_key(model_key, qualname)] = model_key
    state = get_state(model)
    for head in state.head if state else []:
        for k in model.get_submodule(head).state_dict():
            keys[f"{head}.{k}"] = f"{head}.{k}"
    for name in state.adapters[adapter_name].base_params if state else []:  # weights trained in place (bitfit, ...)
        keys.setdefault(name, name)
    return keys


def _adapter_tensors(model: nn.Module, adapter_name: str, keys: dict[str, str]) -> dict[str, Tensor]:
    """The tensors of ``keys`` (from :func:`_saved_keys`) by file key; an inactive adapter's in-place
    weights come from where they were put aside."""
    state = get_state(model)
    model_state = model.state_dict()
    aside = {}
    if state is not None and adapter_name != state.active:
        aside = {**state.pristine, **state.stash.get(adapter_name, {})}
    return {f: aside.get(m, model_state[m]) for f, m in keys.items()}


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, Tensor]:
    """The tensors :func:`save_adapter` writes, under their file names."""
    state = get_state(model)
    if state is None:
        raise ValueError("the model has no monatune adapters; call monatune.apply(model, method) first")
    name = adapter_name or state.active
    if name not in state.adapters:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(state.adapters)}")
    return _adapter_tensors(model, name, _saved_keys(model, name))


def base_fingerprint(model: nn.Module, exclude: set[str]) -> str:
    """Hash of every state tensor except the adapters and ``exclude``: names, dtypes, shapes, values.

    Weights that an adapter trains in place or that a merge changed are hashed with their
    frozen values, so the fingerprint does not depend on which adapter is active.
    """
    adapter_prefixes = tuple(f"{q}." for q, _, _ in adapter_modules(model))
    state = get_state(model)
    frozen: dict[str, Tensor | None] = {}
    if state is not None:
        frozen = {**state.pristine, **state.merge_backup}
    digest = hashlib.blake2b(digest_size=16)
    for key, tensor in sorted(model.state_dict().items()):
        if key in exclude or key.startswith(adapter_prefixes):
            continue
        if key in frozen:
            if frozen[key] is None:
                continue  # a bias a merge added
            tensor = frozen[key]
        if tensor.is_meta:
            raise ValueError("the model's weights are on the meta device; materialise them before saving or loading")
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _owned_files(path: Path) -> set[str]:
    """Names monatune wrote in an existing adapter directory (config, weights, the extra files it lists)."""
    owned = {CONFIG_NAME, WEIGHTS_NAME}
    try:
        listed = json.loads((path / CONFIG_NAME).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    return owned | set(listed if isinstance(listed, dict) else {})


def _check_destination(path: Path) -> None:
    """Refuse to replace anything but an adapter directory (or an empty one)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"'{path}' exists and is not a directory; an adapter is saved as a directory")
    if path.is_dir() and not (path / CONFIG_NAME).is_file():
        others = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
        if others:
            raise ValueError(
                f"'{path}' is a folder with other files ({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}) "
                "and no adapter in it; save the adapter to a new or empty folder"
            )


def save_adapter(
    model: nn.Module,
    path: str | Path,
    *,
    adapter_name: str | None = None,
    dtype: torch.dtype | None = None,
    metadata: dict[str, Any] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Save one adapter (its tensors, the head, any trained base tensors) to a directory.

    The directory is replaced in one step: it holds either the complete old adapter or the
    complete new one at every instant, whatever interrupts the save (an error, Ctrl-C, kill -9,
    a full disk); the next save clears what an interrupted one left beside it. Files that
    monatune did not write there (a README) are kept. An existing folder that holds other files
    but no adapter is refused.

    Args:
        model: A model tuned with :func:`monatune.apply`.
        path: Directory to write; created if needed.
        adapter_name: Which adapter (default: the active one).
        dtype: Cast floating tensors to this dtype (e.g. ``torch.float16`` halves the file).
        metadata: Extra JSON-serialisable fields for the config.
        extra_files: More files to write in the same step, by name (e.g. a detector's heads);
            the config records their hashes, and :func:`read_adapter_file` checks them.

    Returns:
        The directory.

    Example:
        >>> monatune.save_adapter(model, "runs/flowers-mona")
        >>> monatune.load_adapter(fresh_model, "runs/flowers-mona")
    """
    state = get_state(model)
    if state is None:
        raise ValueError("the model has no monatune adapters; call monatune.apply(model, method) first")
    name = adapter_name or state.active
    if name not in state.adapters:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(state.adapters)}")
    path = Path(path)
    recover_directory(path)
    _check_destination(path)
    extra = dict(extra_files or {})
    for file_name, data in extra.items():
        if file_name in (CONFIG_NAME, WEIGHTS_NAME) or Path(file_name).name != file_name or file_name.startswith("."):
            raise ValueError(f"extra file name {file_name!r} must be a plain file name other than {CONFIG_NAME}, {WEIGHTS_NAME}")
        if not isinstance(data, bytes):
            raise ValueError(f"extra file {file_name!r} must be bytes, got {type(data).__name__}")
    # everything is built and checked before the first byte is written
    keys = _saved_keys(model, name)
    tensors = {}
    for file_key, t in _adapter_tensors(model, name, keys).items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[file_key] = t.cpu().contiguous()
    blob = save_safetensors_bytes(tensors, metadata={"format": "pt"})
    spec = state.adapters[name]
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "monatune_version": __version__,
        "adapter_name": name,
        "method": spec.method,
        "options": spec.options,
        "targets": spec.targets,
        "layout": spec.layout,
        "backbone": model_name(model),
        "dense": hasattr(model, "out_channels"),
        "head": list(state.head),
        "blocks": _block_table(model),
        "base_fingerprint": base_fingerprint(model, exclude=set(keys.values())),
        "num_tensors": len(tensors),
        "num_parameters": sum(t.numel() for t in tensors.values()),
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "files": {n: hashlib.sha256(d).hexdigest() for n, d in extra.items()},
        "metadata": metadata or {},
    }
    try:
        config_text = json.dumps(config, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"the adapter's metadata must be JSON-serialisable ({e}); nothing was written") from None
    staged = staging_directory(path)
    try:
        (staged / WEIGHTS_NAME).write_bytes(blob)
        for file_name, data in extra.items():
            (staged / file_name).write_bytes(data)
        (staged / CONFIG_NAME).write_text(config_text)
        if path.is_dir():  # keep what the user put beside the adapter
            owned = _owned_files(path) | set(extra)
            for f in path.iterdir():
                if f.is_file() and not f.name.startswith(".") and f.name not in owned:
                    shutil.copy2(f, staged / f.name)
        replace_directory(staged, path)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return path


def _block_table(model: nn.Module) -> list[dict[str, Any]]:
    """The model's blocks in forward order (name, family, width): lets another package's model of the
    same architecture load the block adapters (:func:`_map_blocks`)."""
    try:
        blocks = find_blocks(model)
    except ValueError:  # no block rules (a `targets=` adapter, or a method that needs no blocks)
        return []
    return [{"name": n, "family": rule_of(b).family, "width": block_dim(b)} for n, b in blocks]


def _map_blocks(saved: Any, model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """The file's block-slot tensors renamed to this model's blocks, matched by position, when the model
    has the same blocks (count and widths) under other names (a transformers Swin for a timm Swin); else None.

    Only tensors in block slots (``<block>.<slot>.<...>``) are renamed: the slot modules are monatune's
    own and the same in every package, while the layers inside a block (LoRA's, a head) are not.
    """
    table = _block_table(model)
    if not isinstance(saved, list) or not table or len(saved) != len(table):
        return None
    try:
        if [b["width"] for b in saved] != [b["width"] for b in table]:
            return None
        rename = {str(s["name"]): t["name"] for s, t in zip(saved, table) if s["name"] != t["name"]}
    except (KeyError, TypeError):
        return None
    if not rename:
        return None
    mapped = {}
    for key, tensor in tensors.items():
        for old, new in rename.items():
            rest = key[len(old) + 1:] if key.startswith(old + ".") else None
            if rest is not None and rest.split(".", 1)[0] in BLOCK_SLOTS:
                key = f"{new}.{rest}"
                break
        mapped[key] = tensor
    return mapped


def _check_config(config: dict[str, Any], config_path: Path) -> None:
    """The fields :func:`load_adapter` relies on, with their types; a newer format is refused."""
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"'{config_path}' has no integer \"format_version\" (found {version!r}); it is not a valid adapter config")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"'{config_path}' is format version {version}, written by a newer monatune "
            f"({config.get('monatune_version', '?')}); this monatune ({__version__}) reads version {FORMAT_VERSION}: upgrade monatune"
        )
    expected = {
        "method": (str,), "options": (dict,), "weights_sha256": (str,), "targets": (str, type(None)),
        "layout": (str,), "head": (list, type(None)), "adapter_name": (str, type(None)), "files": (dict,),
    }  # fmt: skip
    required = ("method", "options", "weights_sha256")
    for key, types in expected.items():
        if key not in config:
            if key in required:
                raise ValueError(f"'{config_path}' has no \"{key}\"; it is not a complete adapter config")
            continue
        if not isinstance(config[key], types):
            allowed = " or ".join("null" if t is type(None) else {"str": "a string", "dict": "a mapping", "list": "a list"}[t.__name__] for t in types)
            raise ValueError(f"'{config_path}': \"{key}\" must be {allowed}, got {config[key]!r}")
    if config.get("layout", "NCHW") not in ("NCHW", "NHWC"):
        raise ValueError(f"'{config_path}': \"layout\" must be \"NCHW\" or \"NHWC\", got {config['layout']!r}")


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and check an adapter directory; returns its config and tensors."""
    path = Path(path)
    recover_directory(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory '{path}' does not exist")
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"'{path}' is not a monatune adapter directory: '{p.name}' is missing")
    config = _read_config(config_path)
    blob = weights_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != config.get("weights_sha256"):
        raise ValueError(
            f"'{weights_path}' does not match the hash in '{config_path}': the files do not belong together "
            "(an interrupted or mixed copy?)"
        )
    try:
        tensors = load_safetensors_bytes(blob)
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"'{weights_path}' is not a readable safetensors file ({e})") from None
    return config, tensors


def _read_config(config_path: Path) -> dict[str, Any]:
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"'{config_path}' is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"'{config_path}' is not a monatune adapter config (no \"format\": \"{FORMAT}\")")
    _check_config(config, config_path)
    return config


def read_adapter_file(path: str | Path, name: str) -> bytes | None:
    """An extra file saved with the adapter (``save_adapter(extra_files=...)``), checked against the config's hash.

    None when the adapter was saved without it.
    """
    path = Path(path)
    recover_directory(path)
    config = _read_config(path / CONFIG_NAME)
    sha = config.get("files", {}).get(name)
    if sha is None:
        return None
    file = path / name
    if not file.is_file():
        raise FileNotFoundError(f"'{file}' is missing; '{path / CONFIG_NAME}' lists it (an incomplete copy?)")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise ValueError(f"'{file}' does not match the hash in '{path / CONFIG_NAME}': the files do not belong together")
    return data


def check_dtypes(tensors: Mapping[str, Tensor], target: Mapping[str, Tensor], source: str) -> None:
    """Refuse integer or boolean file tensors for floating-point model tensors (a copy would silently cast them)."""
    wrong = [
        f"{k} ({tensors[k].dtype} in the file, {target[k].dtype} in the model)"
        for k in sorted(set(tensors) & set(target))
        if target[k].is_floating_point() and not (tensors[k].is_floating_point() or tensors[k].is_complex())
    ]
    if wrong:
        raise ValueError(
            f"'{source}' holds integer tensors where the model has floating-point weights ({len(wrong)}): "
            f"{wrong[:3]}{' ...' if len(wrong) > 3 else ''}; it was not written by monatune from this model"
        )


def load_adapter(
    model: nn.Module,
    path: str | Path,
    *,
    adapter_name: str | None = None,
    check_base: bool = True,
) -> nn.Module:
    """Load an adapter directory into ``model``, adding the adapter if the model lacks it.

    The base model must be the one the adapter was trained on: same architecture, and (unless
    ``check_base=False``) the same frozen weights, checked by fingerprint. Missing,
    unexpected or misshapen tensors are listed by name. If anything does not fit, the model
    is left exactly as it was.

    Args:
        model: The base model (plain or already tuned).
        path: Adapter directory written by :func:`save_adapter`.
        adapter_name: Name to load it under (default: the name it was saved with).
        check_base: Compare the fingerprint of the frozen base weights.

    Returns:
        ``model``, with the adapter loaded and active.
    """
    config, tensors = read_adapter(path)
    name = adapter_name or config.get("adapter_name") or "default"
    arch, saved_arch = model_name(model), config.get("backbone")
    if arch and saved_arch and arch != saved_arch:
        raise ValueError(f"adapter '{path}' was trained on {saved_arch}, but the model is {arch}")

    options = resolve_method(config["method"], config["options"]).to_dict()  # checks them, JSON lists -> tuples
    state = get_state(model)
    existing = state is not None and name in state.adapters
    if existing and (state.adapters[name].method, state.adapters[name].options) != (config["method"], options):
        raise ValueError(
            f"the model's adapter {name!r} is {state.adapters[name].method} {state.adapters[name].options}, but "
            f"'{path}' holds {config['method']} {config['options']}; load it under another `adapter_name`"
        )
    if not existing:
        apply(
            model,
            config["method"],
            head=config.get("head") or None,
            targets=config.get("targets"),
            layout=config.get("layout", "NCHW"),
            adapter_name=name,
            **options,
        )
    try:
        keys = _saved_keys(model, name)
        target = model.state_dict()
        remapped = False
        if set(keys) != set(tensors):
            mapped = _map_blocks(config.get("blocks"), model, tensors)
            if mapped is not None and set(mapped) == set(keys):
                tensors, remapped = mapped, True
        missing = sorted(set(keys) - set(tensors))
        unexpected = sorted(set(tensors) - set(keys))
        misshapen = [
            f"{k} {tuple(tensors[k].shape)} in the file, {tuple(target[keys[k]].shape)} in the model"
            for k in sorted(set(keys) & set(tensors))
            if tuple(tensors[k].shape) != tuple(target[keys[k]].shape)
        ]
        if missing or unexpected or misshapen:
            parts = [
                f"{label} ({len(items)}): {items[:5]}{' ...' if len(items) > 5 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
                if items
            ]
            raise ValueError(
                f"adapter '{path}' does not fit this model ({arch or type(model).__name__}): " + "; ".join(parts)
            )
        check_dtypes({k: tensors[k] for k in keys}, {k: target[m] for k, m in keys.items()}, str(path))
        if check_base and remapped:
            raise ValueError(
                f"adapter '{path}' was saved from a model whose blocks have other names "
                f"({config['blocks'][0]['name']!r} is {_block_table(model)[0]['name']!r} here: another package's "
                "implementation); "
                "its block adapters map by position, but the base weights cannot be compared across packages: "
                "load the same pretrained weights and pass check_base=False"
            )
        if check_base:
            found = base_fingerprint(model, exclude=set(keys.values()))
            if found != config.get("base_fingerprint"):
                raise ValueError(
                    f"the model's frozen base weights differ from those adapter '{path}' was trained on "
                    f"(fingerprint {found} vs {config.get('base_fingerprint')}); load the same pretrained weights "
                    "first, or pass check_base=False if you know the difference is intended"
                )
        set_active_adapter(model, name)  # puts the outgoing adapter's in-place weights aside
    except BaseException:
        if not existing:
            remove_adapter(model, name)
        raise
    target = model.state_dict()
    with torch.no_grad():
        for file_key, model_key in keys.items():
            target[model_key].copy_(tensors[file_key])
    return model
