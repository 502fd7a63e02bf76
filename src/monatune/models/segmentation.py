"""Semantic segmentation on a monatune dense backbone: UPerNet with an auxiliary FCN head.

The release's ADE20K model is mmsegmentation's ``EncoderDecoder``: the (tuned) backbone's four
stage maps (strides 4-32) feed a ``UPerHead`` (Xiao et al., "Unified Perceptual Parsing for Scene
Understanding", ECCV 2018; ``channels=512``, ``pool_scales=(1, 2, 3, 6)``, ``dropout_ratio=0.1``,
``align_corners=False``) and the third map an auxiliary ``FCNHead`` (``channels=256``, one
convolution, no input concatenation, dropout 0.1, loss weight 0.4). Both heads predict at their
input's resolution; their logits are resized bilinearly to the image, as mmsegmentation does
before the loss and at test time. The heads are fully trainable; the backbone follows the method.

ViT-family backbones have one output stride; as for detection, :class:`SimpleFeaturePyramid`
builds the four scales from their last block's map.

Why the heads are written here: segmentation-models-pytorch's UPerNet decoder gives each
pyramid-pooling branch ``in_channels / 4`` channels and fuses differently from mmsegmentation's
UPerHead, and takes only smp encoders; transformers' ``UperNetHead`` ports UPerHead but omits its
dropout, needs a ``UperNetConfig`` and brings in the transformers package. So the release's heads
are written here on torchvision's ``Conv2dNormActivation`` (mmcv's ``ConvModule``: convolution
without bias, norm, ReLU), with mmsegmentation's submodule names (``psp_modules``, ``bottleneck``,
``lateral_convs``, ``fpn_convs``, ``fpn_bottleneck``, ``conv_seg``) and initialisation (Kaiming
normal, fan-out, for the convolutions; normal with std 0.01 for ``conv_seg``). The norm is
``BatchNorm2d``, the single-process form of the release's SyncBN (Lightning's
``sync_batchnorm=True`` converts it).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from .dense import build_dense_backbone, is_hierarchical
from .detection.builders import SimpleFeaturePyramid

__all__ = ["UPerHead", "FCNHead", "SegmentationNetwork", "build_segmenter"]

NormLayer = Callable[..., nn.Module]


def _conv(in_channels: int, out_channels: int, kernel_size: int, norm_layer: NormLayer) -> Conv2dNormActivation:
    """mmcv's ``ConvModule``: conv (no bias, "same" padding), norm, ReLU."""
    return Conv2dNormActivation(in_channels, out_channels, kernel_size, norm_layer=norm_layer, activation_layer=nn.ReLU)


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value


def _pooling_matrix(size: int, n: int, like: Tensor) -> Tensor:
    """(size, n): row i averages the inputs ``floor(i n / size) <= j < ceil((i + 1) n / size)`` (adaptive pooling's
    bins)."""
    i = torch.arange(size, device=like.device)
    start = torch.div(i * n, size, rounding_mode="floor")
    end = torch.div((i + 1) * n + size - 1, size, rounding_mode="floor")
    j = torch.arange(n, device=like.device)
    inside = (j >= start[:, None]) & (j < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


class PyramidPool(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d``; under the TorchScript ONNX exporter the same bins as two matrix products.

    That exporter translates adaptive pooling only for a map whose size its shape inference kept and that the
    output size divides (torch.onnx's ``adaptive_avg_pool2d`` symbolic: "input size not accessible" on a dense
    backbone's padded, cropped maps), and it would fix the size; the matrices are built from the map's size in the
    graph, so the exported pyramid pooling takes any size.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not torch.onnx.is_in_onnx_export():
            return super().forward(x)
        sh, sw = (self.output_size, self.output_size) if isinstance(self.output_size, int) else self.output_size
        return _pooling_matrix(sh, x.shape[-2], x) @ x @ _pooling_matrix(sw, x.shape[-1], x).transpose(0, 1)


class _DecodeHead(nn.Module):
    """mmsegmentation's ``BaseDecodeHead`` tail: ``Dropout2d``, then the 1x1 classifier ``conv_seg``."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        _positive_int("channels", channels)
        _positive_int("num_classes", num_classes)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
        self.channels = channels
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def cls_seg(self, feats: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(feats))

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, Conv2dNormActivation):  # mmcv ConvModule.init_weights; norms keep 1 / 0
                nn.init.kaiming_normal_(m[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)


class UPerHead(_DecodeHead):
    """UPerNet's decoder as mmsegmentation's ``UPerHead``: a pyramid pooling module on the last map,
    an FPN over all maps, and the fused levels classified at the first map's resolution.

    Args:
        in_channels: Channels of the input maps, finest first (the release: the four Swin stages).
        num_classes: Output classes.
        channels: Width of every internal map (the release: 512).
        pool_scales: Output sizes of the pyramid pooling branches.
        dropout: ``Dropout2d`` rate before ``conv_seg``.
        norm_layer: Norm of the conv modules.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        *,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        if isinstance(in_channels, int) or not in_channels:
            raise ValueError(f"`in_channels` must be a non-empty sequence of channel counts, got {in_channels!r}")
        self.in_channels = [_positive_int("in_channels[i]", c) for c in in_channels]
        if isinstance(pool_scales, int) or not pool_scales:
            raise ValueError(f"`pool_scales` must be a non-empty sequence of positive ints, got {pool_scales!r}")
        self.pool_scales = [_positive_int("pool_scales[i]", s) for s in pool_scales]
        top = self.in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(PyramidPool(s), _conv(top, channels, 1, norm_layer)) for s in self.pool_scales
        )
        self.bottleneck = _conv(top + len(self.pool_scales) * channels, channels, 3, norm_layer)
        self.lateral_convs = nn.ModuleList(_conv(c, channels, 1, norm_layer) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_conv(channels, channels, 3, norm_layer) for _ in self.in_channels[:-1])
        self.fpn_bottleneck = _conv(len(self.in_channels) * channels, channels, 3, norm_layer)
        self._init_weights()

    def psp_forward(self, x: Tensor) -> Tensor:
        """Pyramid pooling on the last map: pooled branches upsampled back, concatenated with it, fused."""
        pooled = [_resize(branch(x), x.shape[-2:]) for branch in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))  # B, channels, H_top, W_top

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        """Logits (B, num_classes, H_0, W_0) at the resolution of ``maps[0]``."""
        if len(maps) != len(self.in_channels):
            raise ValueError(f"UPerHead was built for {len(self.in_channels)} maps, got {len(maps)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, maps)] + [self.psp_forward(maps[-1])]
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(x, size) for x in outs[1:]], dim=1))
        return self.cls_seg(fused)


class FCNHead(_DecodeHead):
    """mmsegmentation's ``FCNHead`` (the release's auxiliary head): 3x3 conv modules, then ``conv_seg``.

    Args:
        in_channels: Channels of the input map.
        num_classes: Output classes.
        channels: Width of the conv modules (the release: 256).
        num_convs: Number of 3x3 conv modules (0: none, then ``in_channels`` must equal ``channels``).
        concat_input: Fuse the input with the convs' output by one more conv module.
        dropout: ``Dropout2d`` rate before ``conv_seg``.
        norm_layer: Norm of the conv modules.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        channels: int = 256,
        num_convs: int = 1,
        concat_input: bool = False,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        self.in_channels = _positive_int("in_channels", in_channels)
        if isinstance(num_convs, bool) or not isinstance(num_convs, int) or num_convs < 0:
            raise ValueError(f"`num_convs` must be an int >= 0, got {num_convs!r}")
        if num_convs == 0 and in_channels != channels:
            raise ValueError(
                f"with `num_convs=0` the input goes to conv_seg, so `channels` must be {in_channels}, got {channels}"
            )
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(*(_conv(a, b, 3, norm_layer) for a, b in zip(widths, widths[1:])))
        self.conv_cat = _conv(in_channels + channels, channels, 3, norm_layer) if concat_input else None
        self._init_weights()

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes, H, W) at the input map's resolution."""
        feats = self.convs(x)
        if self.conv_cat is not None:
            feats = self.conv_cat(torch.cat([x, feats], dim=1))
        return self.cls_seg(feats)


class SegmentationNetwork(nn.Module):
    """Dense backbone, optional simple pyramid, decode head and auxiliary head.

    ``forward(images)`` returns ``{"out": logits}`` and, in training with an auxiliary head,
    ``"aux"``; both (B, num_classes, H, W), resized to the images. Any image size works: the
    backbone pads to its patch size and Swin's patch merging pads odd maps, as in the release.

    Args:
        backbone: A dense backbone (:func:`monatune.build_dense_backbone`); what the method tunes.
        decode_head: Takes the list of the four maps.
        aux_head: Takes map ``aux_index`` (None: no auxiliary output).
        pyramid: Turns the backbone's last map into four (ViTs), or None (Swin).
        aux_index: The map the auxiliary head reads (the release: 2, the third stage).
    """

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: nn.Module,
        aux_head: nn.Module | None = None,
        *,
        pyramid: nn.Module | None = None,
        aux_index: int = 2,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pyramid = pyramid
        self.decode_head = decode_head
        self.aux_head = aux_head
        self.aux_index = aux_index

    def features(self, images: Tensor) -> list[Tensor]:
        """The four maps the heads read, finest first (strides 4, 8, 16, 32)."""
        maps = self.backbone(images)
        if self.pyramid is not None:
            maps = self.pyramid(maps[next(reversed(maps))])
        return list(maps.values())

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        size = images.shape[-2:]
        maps = self.features(images)
        out = {"out": _resize(self.decode_head(maps), size)}
        if self.aux_head is not None and self.training:
            out["aux"] = _resize(self.aux_head(maps[self.aux_index]), size)
        return out


def build_segmenter(
    backbone: str,
    *,
    num_classes: int,
    method: str | None = None,
    method_options: dict | None = None,
    model_kwargs: dict | None = None,
    channels: int = 512,
    aux_channels: int = 256,
    aux: bool = True,
    dropout: float = 0.1,
) -> SegmentationNetwork:
    """UPerNet with an auxiliary FCN head on a (tuned) timm backbone, as the release's ADE20K model.

    Args:
        backbone: timm model name (Swin v1, ViT family).
        num_classes: Classes predicted (ADE20K: 150; label 255 is left to the loss to ignore).
        method: Tuning method for the backbone (None: leave it untuned, e.g. to apply later).
        method_options: The method's options.
        model_kwargs: Extra ``timm.create_model`` arguments (the release's ``drop_path_rate``).
        channels: Width of the UPerHead (the release: 512).
        aux_channels: Width of the auxiliary FCN head (the release: 256).
        aux: Build the auxiliary head (its loss weight, 0.4 in the release, is the task's).
        dropout: ``Dropout2d`` rate before both classifiers.

    Returns:
        The network; ``model.backbone`` is the dense backbone the method applies to.

    Example:
        >>> model = build_segmenter("swin_large_patch4_window7_224", num_classes=150, method="mona")
        >>> model(torch.rand(2, 3, 512, 512))["out"].shape
        torch.Size([2, 150, 512, 512])
    """
    _positive_int("num_classes", num_classes)
    # hierarchical families: every stage (default out_indices); plain ViTs: the last block feeds the pyramid
    body = build_dense_backbone(backbone, method, out_indices=None if is_hierarchical(backbone) else [-1], model_kwargs=model_kwargs,
                                **(method_options or {}))  # fmt: skip
    pyramid = None if body.hierarchical else SimpleFeaturePyramid(body.out_channels[-1])
    in_channels = pyramid.out_channels if pyramid is not None else body.out_channels
    decode_head = UPerHead(in_channels, num_classes, channels=channels, dropout=dropout)
    aux_head = FCNHead(in_channels[2], num_classes, channels=aux_channels, dropout=dropout) if aux else None
    return SegmentationNetwork(body, decode_head, aux_head, pyramid=pyramid, aux_index=2)
