"""Convert a checkpoint trained with the Mona authors' release into a monatune adapter directory."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..dense import build_dense_backbone
from .adapter import save_adapter
from .pretrained import load_pretrained

__all__ = ["convert_release_checkpoint"]


def convert_release_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    model_name: str,
    *,
    model_kwargs: dict[str, Any] | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Write the Mona adapters of a release-trained checkpoint as a monatune adapter directory.

    The release's checkpoint holds the whole backbone; its frozen tensors become the base
    fingerprint of the adapter, so the adapter later loads onto a backbone with the same
    pretrained weights (for example the official Swin ``.pth`` it was trained from). The
    release's neck and heads are not part of the backbone adapter.

    Args:
        checkpoint: The release's ``.pth`` (OpenMMLab layout with ``my_module_1/2``).
        out_dir: Adapter directory to write.
        model_name: The timm architecture it was trained on, e.g. ``swin_base_patch4_window7_224``.
        model_kwargs: Extra ``timm.create_model`` arguments (window size, ...).
        allow_pickle: Allow a full unpickle (runs code in the file); see ``load_pretrained``.
    """
    backbone = build_dense_backbone(model_name, "mona", model_kwargs=model_kwargs)
    report = load_pretrained(backbone, checkpoint, format="release", allow_pickle=allow_pickle)
    missing = [k for k in report.missing if ".after_attn." in k or ".after_mlp." in k]
    if missing:
        raise ValueError(f"'{checkpoint}' has no Mona tensors for {missing[:5]}; is it a Mona checkpoint of {model_name}?")
    return save_adapter(backbone, out_dir, metadata={"converted_from": str(checkpoint)})
