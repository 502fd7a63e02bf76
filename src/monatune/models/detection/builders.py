"""torchvision detectors on a monatune dense backbone: FPN neck, RetinaNet, FCOS, Faster/Mask R-CNN.

The backbone (:func:`monatune.build_dense_backbone`, tuned by any method) hands its stage maps
to torchvision's ``FeaturePyramidNetwork``; the neck and heads are torchvision's and fully
trainable, the backbone follows the method. As in the release's configurations:

- R-CNNs use all four stages (strides 4-32) plus a max-pooled P6;
- RetinaNet and FCOS use stages 2-4 (strides 8-32; the Swin backbone then has no ``norm0``)
  plus P6 from the last stage and P7 from P6 with no ReLU between (mmdetection's
  ``add_extra_convs="on_input"``, ``relu_before_extra_convs=False``; torchvision's
  ``LastLevelP6P7`` applies a ReLU to P6 first).

The FPN's convolutions are initialised Xavier-uniform as mmdetection's (torchvision: Kaiming-uniform).

ViT-family backbones have one output stride; :class:`SimpleFeaturePyramid` builds the four
scales from their last block's map as ViTDet does (two and one transposed convolutions up,
identity, a max-pool down), and the FPN runs on those.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from timm.layers import LayerNorm2d
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from ..dense import build_dense_backbone, is_hierarchical
from .retinanet import MMDetRetinaNet

__all__ = ["SimpleFeaturePyramid", "FeatureBackbone", "build_feature_backbone", "build_detector", "DETECTORS"]

DETECTORS = ("retinanet", "fcos", "faster_rcnn", "mask_rcnn", "cascade_mask_rcnn")
_SINGLE_STAGE = ("retinanet", "fcos")
_EXTRA = ("maxpool", "p6p7", "p6p7_relu")


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from one stride-``s`` map: strides s/4, s/2, s and 2s."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(c, c // 2, 2, stride=2), LayerNorm2d(c // 2), nn.GELU(), nn.ConvTranspose2d(c // 2, c // 4, 2, stride=2)
        )
        self.up2 = nn.ConvTranspose2d(c, c // 2, 2, stride=2)
        self.down2 = nn.MaxPool2d(2)
        self.out_channels = [c // 4, c // 2, c, c]

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return OrderedDict([("0", self.up4(x)), ("1", self.up2(x)), ("2", x), ("3", self.down2(x))])


class LastLevelP6P7NoReLU(LastLevelP6P7):
    """mmdet's ``add_extra_convs="on_input"`` extra levels: P6 = conv(C5), P7 = conv(P6), no ReLU between.

    P6 always reads C5 (torchvision's reads P5 when C5 already has the FPN's width).
    """

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(c[-1])
        p.extend([p6, self.p7(p6)])
        names.extend(["p6", "p7"])
        return p, names


class FeatureBackbone(nn.Module):
    """Dense backbone (``body``), optional simple pyramid, and FPN; torchvision's backbone contract.

    ``out_channels`` is the FPN width; ``forward`` returns the FPN's ordered dict of maps.
    ``extra``: the levels above the last stage: ``"maxpool"`` (R-CNNs), ``"p6p7"`` (P6 from C5, P7
    from P6, mmdet ``on_input``) or ``"p6p7_relu"`` (P6 from P5, P7 from ReLU(P6), mmdet ``on_output``
    with ``relu_before_extra_convs``, as H2RBox uses; torchvision's ``LastLevelP6P7`` at FPN width).
    """

    def __init__(self, body: nn.Module, *, levels: list[int], extra: str, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.pyramid = None if getattr(body, "hierarchical", False) else SimpleFeaturePyramid(body.out_channels[-1])
        channels = self.pyramid.out_channels if self.pyramid is not None else body.out_channels
        self.levels = list(levels)
        in_channels = [channels[i] for i in self.levels]
        if extra not in _EXTRA:
            raise ValueError(f"`extra` must be one of {_EXTRA}, got {extra!r}")
        if extra == "p6p7":
            extra_blocks = LastLevelP6P7NoReLU(in_channels[-1], out_channels)
        elif extra == "p6p7_relu":  # mmdet "on_output" + relu_before_extra_convs: P6 = conv(P5), P7 = conv(ReLU(P6))
            extra_blocks = LastLevelP6P7(out_channels, out_channels)
        else:
            extra_blocks = LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_blocks)
        for conv in (m for m in self.fpn.modules() if isinstance(m, nn.Conv2d)):  # mmdet's FPN.init_weights
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> "OrderedDict[str, Tensor]":
        maps = self.body(images)
        if self.pyramid is not None:
            maps = self.pyramid(maps[next(reversed(maps))])
        picked = OrderedDict((str(k), maps[str(i)]) for k, i in enumerate(self.levels))
        return self.fpn(picked)


def build_feature_backbone(
    name: str,
    *,
    detector: str = "faster_rcnn",
    method: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    out_channels: int = 256,
    **options: Any,
) -> FeatureBackbone:
    """The dense backbone of a timm Swin/ViT with the FPN a detector of kind ``detector`` uses."""
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose from {DETECTORS}")
    single = detector in _SINGLE_STAGE
    levels = [1, 2, 3] if single else [0, 1, 2, 3]
    # hierarchical (Swin, ConvNeXt, ...): the stages the FPN reads (their output norms only); plain ViTs: the
    # last block feeds the pyramid
    body = build_dense_backbone(name, method, out_indices=levels if is_hierarchical(name) else [-1], model_kwargs=model_kwargs, **options)
    return FeatureBackbone(body, levels=levels, extra="p6p7" if single else "maxpool", out_channels=out_channels)


def build_detector(
    kind: str,
    backbone: str,
    *,
    num_classes: int,
    method: str | None = None,
    method_options: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    **detector_kwargs: Any,
) -> nn.Module:
    """A torchvision detector of ``kind`` on a (tuned) timm backbone.

    Args:
        kind: ``retinanet``, ``fcos``, ``faster_rcnn``, ``mask_rcnn`` or ``cascade_mask_rcnn``.
        backbone: timm model name (Swin v1, ViT family).
        num_classes: Object classes, not counting the background; labels run 1..num_classes.
        method: Tuning method for the backbone (None: leave it untuned, e.g. to apply later).
        method_options: The method's options.
        model_kwargs: Extra ``timm.create_model`` arguments.
        min_size: Shorter side the detector's transform resizes to (torchvision's ``min_size``).
        max_size: Longest side it allows.
        fpn_channels: Width of the FPN's maps and so of the heads reading them (the release: 256).
        **detector_kwargs: Passed to the torchvision detector (``score_thresh``, ...).

    Returns:
        The detector; ``detector.backbone.body`` is the dense backbone the method applies to.

    Example:
        >>> model = build_detector("retinanet", "swin_large_patch4_window7_224", num_classes=20, method="mona")
    """
    features = build_feature_backbone(backbone, detector=kind, method=method, model_kwargs=model_kwargs,
                                      out_channels=fpn_channels, **(method_options or {}))
    classes = num_classes + 1  # torchvision counts the background (label 0)
    common = dict(min_size=min_size, max_size=max_size, **detector_kwargs)
    if kind == "retinanet":  # sigmoid classes without a background channel, the release's RetinaHead
        return MMDetRetinaNet(features, num_classes, **common)
    if kind == "fcos":
        return FCOS(features, classes, **common)
    if kind == "faster_rcnn":
        return FasterRCNN(features, classes, **common)
    if kind == "mask_rcnn":
        return MaskRCNN(features, classes, **common)
    from .cascade import CascadeMaskRCNN

    return CascadeMaskRCNN(features, classes, **common)
