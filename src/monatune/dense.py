"""Dense-prediction feature backbones: four NCHW feature maps from a timm Swin or ViT.

The released detection/segmentation backbone hands its neck one feature map per stage,
each through its own output LayerNorm (``norm0`` .. ``norm3``), and has no classifier and no
final norm. :func:`build_dense_backbone` turns a timm model into exactly that, keeping
timm's parameter names, so timm checkpoints, official Swin files and the release's
checkpoints all load by name. The output norms count as backbone parameters and stay
frozen unless a method trains norms; a classification checkpoint has no values for them,
so they keep weight 1 / bias 0.

- Swin: stage i's output (before the next patch merging), strides 4, 8, 16, 32. The input
  is zero-padded on the right/bottom to a multiple of the patch size, the window size stays
  fixed at every stage and shifted windows pad before the shift, as in the release
  (see :mod:`monatune.models.swin`).
- ViT family: the outputs of four evenly spaced blocks, all at the patch stride, with the
  prefix tokens dropped; any input size (padded to the patch size). The detection issue's
  simple feature pyramid turns these into a multi-scale pyramid.

Like a torchvision backbone, the module returns an ordered dict (``"0"`` .. ``"3"``) and
describes itself with ``out_channels`` (one per map) and ``strides``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import timm
import torch.nn.functional as F
from timm.models.eva import Eva
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .models.base import swap_class
from .models.swin import TunedSwinBlock

__all__ = ["build_dense_backbone", "freeze_stages", "DenseSwin", "DenseViT", "DenseEva", "DENSE_FAMILIES"]

DENSE_FAMILIES = "timm Swin v1 (swin_*), timm ViT/DeiT/DINOv2 (vit_*, deit_*), timm EVA (eva*)"


class _DenseMixin:
    """Shared by the dense classes; each is swapped onto an existing timm model."""

    out_channels: list[int]
    strides: list[int]
    out_indices: list[int]
    model_name: str

    def _add_output_norms(self, channels: Sequence[int], indices: Sequence[int] | None = None) -> None:
        for i, c in enumerate(channels):
            if indices is None or i in indices:
                self.add_module(f"norm{i}", nn.LayerNorm(c))  # type: ignore[attr-defined]
        self.out_channels = list(channels)

    def _pad_to_patch(self, x: Tensor) -> Tensor:
        ph, pw = self.patch_embed.patch_size  # type: ignore[attr-defined]
        H, W = x.shape[-2:]
        return F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))

    def _output(self, i: int, x: Tensor) -> Tensor:
        """Output norm ``i`` on an NHWC map, returned as an NCHW view."""
        return getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2)


class DenseSwin(SwinTransformer, _DenseMixin):
    """A timm SwinTransformer returning its stage maps (class swapped in).

    ``out_indices`` are the stages returned (keys ``"i"``), each with its output norm ``norm{i}``;
    ``out_channels`` and ``strides`` describe every stage, returned or not.
    """

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":  # type: ignore[override]
        x = self.patch_embed(self._pad_to_patch(x))  # B, H/4, W/4, C
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i in self.out_indices:
                out[str(i)] = self._output(i, x)  # B, C_i, H_i, W_i
        return out


class _DenseTokens(_DenseMixin):
    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        feats = self.forward_intermediates(  # type: ignore[attr-defined]
            self._pad_to_patch(x), indices=self.out_indices, norm=False, output_fmt="NCHW", intermediates_only=True
        )
        return OrderedDict((str(i), self._output(i, f.permute(0, 2, 3, 1))) for i, f in enumerate(feats))


class DenseViT(VisionTransformer, _DenseTokens):
    """A timm VisionTransformer returning four block outputs as maps (class swapped in)."""

    forward = _DenseTokens.forward


class DenseEva(Eva, _DenseTokens):
    """A timm Eva returning four block outputs as maps (class swapped in)."""

    forward = _DenseTokens.forward


def create_timm_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model``, with an argument the architecture does not take reported as a ValueError
    naming it (timm raises a TypeError from deep inside the model's constructor)."""
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        if "keyword argument" not in str(e) and "multiple values" not in str(e):
            raise
        reason = str(e).split(")", 1)[-1].strip() or str(e)
        raise ValueError(f"{name} cannot be built with these arguments ({reason}); check model_kwargs") from None


def build_dense_backbone(
    name: str,
    method: str | None = None,
    *,
    out_indices: Sequence[int] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> nn.Module:
    """Build the dense-prediction backbone of a timm architecture, optionally tuned.

    Args:
        name: A timm model name (``swin_base_patch4_window7_224``, ``vit_base_patch16_224``, ...).
        method: A tuning method to apply (``"mona"``), or None for the plain backbone.
        out_indices: Swin: the stages returned, each with its output norm (default: all four;
            the release's RetinaNet: ``[1, 2, 3]``, no ``norm0``). ViTs: the blocks whose outputs
            are returned (default: four evenly spaced, ending with the last; ``[-1]``: the last only).
        model_kwargs: Extra arguments for ``timm.create_model`` (e.g. ``embed_dim``,
            ``depths`` for a small model, ``drop_path_rate``).
        **options: The method's options.

    Returns:
        The backbone; ``backbone(images)`` gives ``{"0": map, ..., "3": map}`` (NCHW).

    Example:
        >>> backbone = build_dense_backbone("swin_base_patch4_window7_224", "mona")
        >>> backbone.out_channels, backbone.strides
        ([128, 256, 512, 1024], [4, 8, 16, 32])
    """
    from .tuning import apply  # late import: tuning imports the models package

    kwargs = dict(model_kwargs or {})
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; dense backbones are built for {DENSE_FAMILIES}")
    if timm.models.is_model_in_modules(name, ["swin_transformer"]):
        model = create_timm_model(
            name, pretrained=False, num_classes=0, always_partition=True, strict_img_size=False, **kwargs
        )
        if type(model) is not SwinTransformer:
            raise ValueError(f"{name!r} is not a timm Swin v1 model; dense backbones are built for {DENSE_FAMILIES}")
        swap_class(model, DenseSwin)
        for block in model.modules():
            if type(block) is SwinTransformerBlock:
                swap_class(block, TunedSwinBlock)
                block.release_windows = True
        model.norm = nn.Identity()  # the classifier's final norm is not part of the dense backbone
        stages = len(model.layers)
        indices = sorted({i + stages if -stages <= i < 0 else i for i in (out_indices if out_indices is not None else range(stages))})
        if not indices or any(not 0 <= i < stages for i in indices):
            raise ValueError(f"`out_indices` must be stage indices in [0, {stages}), got {list(out_indices or [])}")
        model._add_output_norms([info["num_chs"] for info in model.feature_info], indices)
        model.strides = [info["reduction"] for info in model.feature_info]
        model.out_indices = indices
    elif timm.models.is_model_in_modules(name, ["vision_transformer", "deit", "eva"]):
        model = create_timm_model(
            name, pretrained=False, num_classes=0, dynamic_img_size=True, dynamic_img_pad=True, **kwargs
        )
        dense_cls = {VisionTransformer: DenseViT, Eva: DenseEva}.get(type(model))
        if dense_cls is None:
            raise ValueError(
                f"{name!r} builds a timm {type(model).__name__}; dense backbones are built for {DENSE_FAMILIES}"
            )
        swap_class(model, dense_cls)
        depth = len(model.blocks)
        if out_indices is not None:  # negative indices count from the last block
            indices = [i + depth if -depth <= i < 0 else i for i in out_indices]
        else:
            indices = sorted({max(0, (depth * k) // 4 - 1) for k in (1, 2, 3, 4)})
        if any(not 0 <= i < depth for i in indices):
            raise ValueError(f"`out_indices` must be block indices in [0, {depth}), got {indices}")
        model.norm = nn.Identity()
        model.out_indices = indices
        model._add_output_norms([model.embed_dim] * len(indices))
        model.strides = [model.patch_embed.feat_ratio()] * len(indices)
    else:
        raise ValueError(f"{name!r} is not one of the families dense backbones are built for: {DENSE_FAMILIES}")
    model.model_name = name
    if method is not None:
        apply(model, method, head=None, **options)
    return model


def freeze_stages(backbone: nn.Module, frozen_stages: int) -> None:
    """The release's Swin ``_freeze_stages``, on top of any method: freeze the first parts of a dense Swin.

    ``frozen_stages >= 0`` freezes the patch embedding, ``>= 1`` also the absolute position
    embedding (if any), ``>= 2`` also stages ``0 .. frozen_stages - 2`` (mmdetection's Swin
    configs; the release's VOC RetinaNet sets 1: the patch embedding is frozen for every method,
    full fine-tuning included). Negative: nothing. ``requires_grad`` is what changes.
    """
    if frozen_stages < 0:
        return
    if not isinstance(backbone, DenseSwin):
        raise ValueError(f"`frozen_stages` applies to dense Swin backbones, got {type(backbone).__name__}")
    parts: list[nn.Module] = [backbone.patch_embed]
    parts += list(backbone.layers)[: max(frozen_stages - 1, 0)]
    for part in parts:
        for p in part.parameters():
            p.requires_grad_(False)
    pos = getattr(backbone, "absolute_pos_embed", None)
    if frozen_stages >= 1 and isinstance(pos, nn.Parameter):
        pos.requires_grad_(False)
