"""Dense-prediction feature backbones: NCHW feature maps from any family in the registry.

The released detection/segmentation backbone hands its neck one feature map per stage,
each through its own output LayerNorm (``norm0`` .. ``norm3``), and has no classifier and no
final norm. :func:`build_dense_backbone` turns a timm model into exactly that, keeping
timm's parameter names, so timm checkpoints, official Swin files and the release's
checkpoints all load by name. The output norms count as backbone parameters and stay
frozen unless a method trains norms; a classification checkpoint has no values for them,
so they keep weight 1 / bias 0.

Each family's file under ``models/`` says how (its :class:`~monatune.models.registry.DenseRule`):

- hierarchical families return stage outputs at strides 4, 8, 16, 32 (Swin v1 as the release
  builds it, see :mod:`monatune.models.swin`; Swin V2, Hiera, ConvNeXt, ResNet);
- plain ViTs (ViT/DeiT/DINOv2, EVA, SAM's ViT) return four evenly spaced blocks' outputs, all at
  the patch stride, prefix tokens dropped; the detection and segmentation heads build the
  scales from the last one with ViTDet's simple feature pyramid.

Like a torchvision backbone, the module returns an ordered dict (``"0"`` .. ``"3"``) and
describes itself with ``out_channels`` (one per map), ``strides`` and ``hierarchical``.
"""
from __future__ import annotations

from typing import Any, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import dense_rule, supported_families

__all__ = [
    "build_dense_backbone", "create_timm_model", "is_hierarchical", "DenseMixin", "stage_indices", "block_indices",
    "ceil_div", "crop", "window_partition", "window_unpartition",
]


def ceil_div(n: int, d: int) -> int:
    """``ceil(n / d)`` for ints and symbolic sizes alike. Padded sizes are written as ``ceil_div(H, w) * w``, not
    ``H + (w - H % w) % w``: under torch.compile with dynamic shapes the modulo form nests through every stage and
    sympy takes minutes over it (models/swin.py)."""
    return (n + d - 1) // d


def crop(x: Tensor, H: int, W: int) -> Tensor:
    """An NHWC map padded to whole windows, cropped back to ``H x W`` (a view). Under torch.compile a contiguous copy
    whatever the padding: the crop's strides would otherwise say whether H and W are whole windows, and every op
    after it would guard on that (one graph per divisibility pattern of the sizes)."""
    x = x[:, :H, :W]
    return x.clone(memory_format=torch.contiguous_format) if torch.compiler.is_compiling() else x


def window_partition(x: Tensor, window: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nh * nw, wh, ww, C), zero-padded on the right and bottom to whole windows; and the
    grid (nh, nw). timm's partition (row-major windows of row-major tokens), padded with :func:`ceil_div`."""
    B, H, W, C = x.shape
    (wh, ww), nh, nw = window, ceil_div(H, window[0]), ceil_div(W, window[1])
    x = F.pad(x, (0, 0, 0, nw * ww - W, 0, nh * wh - H))
    x = x.view(B, nh, wh, nw, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh, ww, C), (nh, nw)


def window_unpartition(windows: Tensor, hw: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """The inverse of :func:`window_partition` for windows (B * nh * nw, wh, ww, C), cropped back to ``hw``."""
    (H, W), (nh, nw), (wh, ww, C) = hw, grid, windows.shape[1:]
    x = windows.view(-1, nh, nw, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return crop(x.reshape(x.shape[0], nh * wh, nw * ww, C), H, W).contiguous()


class DenseMixin:
    """Shared by the dense classes; each is swapped onto an existing model."""

    out_channels: list[int]
    strides: list[int]
    out_indices: list[int]
    model_name: str
    hierarchical: bool = True

    def _add_output_norms(self, channels: Sequence[int], indices: Sequence[int] | None = None) -> None:
        """One LayerNorm per map (``norm{i}``, for the maps in ``indices`` or all)."""
        for i, c in enumerate(channels):
            if indices is None or i in indices:
                self.add_module(f"norm{i}", nn.LayerNorm(c))  # type: ignore[attr-defined]
        self.out_channels = list(channels)

    def _describe_stages(
        self, channels: Sequence[int], strides: Sequence[int], out_indices: Sequence[int] | None, *, norms: bool = True
    ) -> None:
        """A hierarchical backbone's stages: ``out_indices`` picks the maps returned (:func:`stage_indices`), each
        through an output norm ``norm{i}`` unless ``norms`` is False; ``out_channels`` and ``strides`` describe
        every stage."""
        indices = stage_indices(out_indices, len(channels))
        if norms:
            self._add_output_norms(channels, indices)
        self.out_channels = list(channels)
        self.strides = list(strides)
        self.out_indices = indices

    def _describe_blocks(self, out_indices: Sequence[int] | None) -> None:
        """A plain ViT's maps: the blocks ``out_indices`` picks (:func:`block_indices`), each through an output
        norm, all of the model's width at the patch stride."""
        self.out_indices = block_indices(out_indices, len(self.blocks))  # type: ignore[attr-defined]
        self._add_output_norms([self.embed_dim] * len(self.out_indices))  # type: ignore[attr-defined]
        self.strides = [self.patch_embed.feat_ratio()] * len(self.out_indices)  # type: ignore[attr-defined]

    def _pad_to_patch(self, x: Tensor, patch: Sequence[int] | None = None) -> Tensor:
        ph, pw = patch or self.patch_embed.patch_size  # type: ignore[attr-defined]
        H, W = x.shape[-2:]
        return F.pad(x, (0, ceil_div(W, pw) * pw - W, 0, ceil_div(H, ph) * ph - H))

    def _output(self, i: int, x: Tensor) -> Tensor:
        """Output norm ``i`` on an NHWC map, returned as an NCHW view."""
        return getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2)


def stage_indices(out_indices: Sequence[int] | None, stages: int) -> list[int]:
    """Sorted stage indices (negative ones count from the last), all stages by default; ValueError if out of range."""
    chosen = list(out_indices) if out_indices is not None else list(range(stages))
    indices = sorted({i + stages if -stages <= i < 0 else i for i in chosen})
    if not indices or any(not 0 <= i < stages for i in indices):
        raise ValueError(f"`out_indices` must be stage indices in [0, {stages}), got {chosen}")
    return indices


def block_indices(out_indices: Sequence[int] | None, depth: int) -> list[int]:
    """Block indices of a plain ViT (negative ones count from the last); default four evenly spaced."""
    if out_indices is None:
        return sorted({max(0, (depth * k) // 4 - 1) for k in (1, 2, 3, 4)})
    indices = [i + depth if -depth <= i < 0 else i for i in out_indices]
    if not indices or any(not 0 <= i < depth for i in indices):
        raise ValueError(f"`out_indices` must be block indices in [0, {depth}), got {list(out_indices)}")
    return indices


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
        name: A timm model name of a family in the registry (``swin_base_patch4_window7_224``,
            ``swinv2_tiny_window8_256``, ``vit_base_patch16_224``, ``samvit_base_patch16``,
            ``hiera_tiny_224``, ``convnext_tiny``, ``resnet50``, ...).
        method: A tuning method to apply (``"mona"``), or None for the plain backbone.
        out_indices: Hierarchical families: the stages returned (default: all four; Swin's
            release RetinaNet: ``[1, 2, 3]``, no ``norm0``). Plain ViTs: the blocks whose outputs
            are returned (default: four evenly spaced, ending with the last; ``[-1]``: the last only).
        model_kwargs: Extra arguments for ``timm.create_model`` (e.g. ``embed_dim``,
            ``depths`` for a small model, ``drop_path_rate``).
        **options: The method's options.

    Returns:
        The backbone; ``backbone(images)`` gives ``{"0": map, ..., "3": map}`` (NCHW), for any
        input size.

    Example:
        >>> backbone = build_dense_backbone("swin_base_patch4_window7_224", "mona")
        >>> backbone.out_channels, backbone.strides
        ([128, 256, 512, 1024], [4, 8, 16, 32])
    """
    from ..tuning import apply  # late import: tuning imports the models package

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; dense backbones are built for {supported_families(dense=True)}")
    rule = dense_rule(name)
    if rule is None:
        raise ValueError(
            f"{name!r} is not one of the families dense backbones are built for: {supported_families(dense=True)}"
        )
    model = rule.build(name, out_indices, dict(model_kwargs or {}))
    model.hierarchical = rule.hierarchical
    model.model_name = name
    if method is not None:
        apply(model, method, head=None, **options)
    return model


def is_hierarchical(name: str) -> bool:
    """Whether ``name``'s dense backbone gives stages at several strides (else one map feeds a simple pyramid)."""
    rule = dense_rule(name) if timm.is_model(name) else None
    return bool(rule and rule.hierarchical)
