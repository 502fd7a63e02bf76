"""Convert a checkpoint trained with the Mona authors' release (any of its methods) into a monatune adapter directory."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models.dense import build_dense_backbone
from .adapter import save_adapter
from ..tuning import adapter_modules
from .pretrained import RELEASE_SLOTS, load_pretrained

__all__ = ["convert_release_checkpoint"]


def convert_release_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    model_name: str,
    *,
    method: str = "mona",
    model_kwargs: dict[str, Any] | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Write the adapter of a release-trained checkpoint as a monatune adapter directory.

    Mona, Adapter and AdaptFormer checkpoints hold ``my_module_1/2`` per block, LoRA ones
    ``qkv.lora_A/B``; for the methods that train the backbone's own weights (bitfit, norm,
    partial-1, full, fixed) the adapter is those weights.

    The release's checkpoint holds the whole backbone; its frozen tensors become the base
    fingerprint of the adapter, so the adapter later loads onto a backbone with the same
    pretrained weights (for example the official Swin ``.pth`` it was trained from). The
    release's neck and heads are not part of the backbone adapter.

    Args:
        checkpoint: The release's ``.pth`` (OpenMMLab layout with ``my_module_1/2``).
        out_dir: Adapter directory to write.
        model_name: The timm architecture it was trained on, e.g. ``swin_base_patch4_window7_224``.
        method: The method it was trained with (``mona``, ``adapter``, ``adaptformer``, ``lora``, ``bitfit``, ...).
        model_kwargs: Extra ``timm.create_model`` arguments (window size, ...).
        allow_pickle: Allow a full unpickle (runs code in the file); see ``load_pretrained``.
    """
    backbone = build_dense_backbone(model_name, method, model_kwargs=model_kwargs)
    fmt = "release" if method in (*RELEASE_SLOTS, "lora") else "auto"
    report = load_pretrained(backbone, checkpoint, format=fmt, allow_pickle=allow_pickle)
    adapter_prefixes = tuple(f"{q}." for q, _, _ in adapter_modules(backbone))
    missing = [k for k in report.missing if k.startswith(adapter_prefixes)]
    if missing:
        raise ValueError(
            f"'{checkpoint}' has no {method} tensors for {missing[:5]}; is it a {method} checkpoint of {model_name}?"
        )
    return save_adapter(backbone, out_dir, metadata={"converted_from": str(checkpoint)})
