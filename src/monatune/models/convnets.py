"""Where the methods go in timm's convolutional networks: ConvNeXt (V1 and V2) and ResNet / ResNeXt.

A convolutional block has one residual add, so it has one Mona, on the stream right after that
add (slot ``after_block``). The Mona authors, who did not try convolutional networks, suggest
one Mona after each residual block for ResNet (Leiyi-HU/mona issue 6). The stream is an NCHW
map; Mona and the other slot modules run channels-last on ``permute`` views (no copy) and
their output is permuted back.

ConvNeXt (``timm.models.convnext.ConvNeXtBlock``, ``convnext_*`` and ``convnextv2_*``; V2 only
adds GRN inside the MLP and drops LayerScale)::

    y = gamma * MLP(LN(DWConv7x7(x)))                   # LayerScale gamma (V1), MLP with GRN (V2)
    x = shortcut(x) + DropPath(mlp_out(y)) + mlp_parallel(shortcut(x))
    x = after_block(x)                                  # Mona

``mlp_out`` sits where it sits in a ViT block (after LayerScale, before DropPath): a Houlsby
adapter or LoRand on the block's branch. ``mlp_parallel`` (AdaptFormer) runs beside the whole
branch (depthwise convolution and MLP), fed the block's input (``shortcut`` is an identity in
timm's ConvNeXt stages). LoRA adapts the MLP's ``fc1``/``fc2`` where they are ``nn.Linear``
(``conv_mlp=False``, most models); models built with ``conv_mlp=True`` (``convnext_atto`` ..
``convnext_nano``, ``convnextv2_atto`` ..) use 1x1 convolutions there, which LoRA refuses.

ResNet (``timm.models.resnet.BasicBlock`` and ``Bottleneck``, which every model of
``timm.models.resnet`` is built from; tested: ``resnet*``, ``resnet*d``, ``resnext*``,
``wide_resnet*``, ``seresnet*``, ``ecaresnet*``, ``resnetblur*``)::

    y = BN(Conv(... ReLU(BN(Conv(x)))))                 # 2 convolutions (basic) or 3 (bottleneck), SE
    x = ReLU(after_block(downsample(x) + DropPath(y)))  # Mona between the add and the final ReLU

Mona goes between the residual add and the block's final ReLU, not after the ReLU (the
authors' "after the block" allows both): that is "after the residual add" to the letter, it is
where Mona sits in Swin and ViT (on the sum ``x + f(x)``), and the block keeps handing the next
block a ReLU output, the non-negative stream its pretrained convolutions and BatchNorms were
trained on (after the ReLU, Mona's residual would add signed values to it). Mona's fused
implementation keeps its output for backward, so the tuned blocks run that ReLU out of place
(timm builds it ``inplace=True``); outputs are unchanged. ResNet blocks have no linear layers and
no MLP branch, so Mona is the only block method: LoRA, adapter, AdaptFormer, LoRand and VPT
raise a ValueError.

BatchNorm. A frozen BatchNorm (every method but ``full``, ``norm`` and ``bitfit``, which train
its affine) stays in eval mode under ``model.train()``: its running statistics never change.
A BatchNorm whose weight or bias trains behaves as in plain PyTorch: in train mode it
normalises with the batch statistics and updates its running mean and variance.

Dense backbones. :class:`DenseConvNeXt` returns each stage's output through its own LayerNorm
over channels (``norm0`` .. ``norm3``, as mmdet/mmseg's ConvNeXt), strides 4, 8, 16, 32; the
input is zero-padded on the right/bottom to a multiple of the last stride (32: the stem and
the downsampling convolutions would otherwise floor the odd sizes away) and each map is cropped
to ``ceil(size / stride)``, the part that covers the image. :class:`DenseResNet` returns
``layer1`` .. ``layer4`` without output norms (torchvision and mmdet's ResNet); its padded
convolutions and pooling already give ``ceil(size / stride)`` for any size, so nothing is padded.
Neither keeps the classifier (nor ConvNeXt's head norm and pre-logits MLP, nor the ``norm_pre`` of its
``_hnf`` models); timm's parameter names are kept, so timm and official checkpoints load by name.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Sequence

from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import Tensor, nn

from .base import TunedBlockMixin, swap_class
from .dense import DenseMixin, create_timm_model
from .registry import BlockRule, DenseRule, register_block, register_dense

__all__ = ["TunedConvNeXtBlock", "TunedBasicBlock", "TunedBottleneck", "DenseConvNeXt", "DenseResNet",
           "build_dense_convnext", "build_dense_resnet"]


class _MapBlockMixin(TunedBlockMixin):
    """Slots on an NCHW stream: the adapters see channels-last views."""

    def _adapt_map(self, slot: str, x: Tensor) -> Tensor:  # B, C, H, W
        """The stream through the adapter in ``slot`` (unchanged if the slot is empty)."""
        adapter = self._slot(slot)
        return x if adapter is None else adapter(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def _branch_map(self, slot: str, y: Tensor, drop_path: nn.Module) -> Tensor:  # B, C, H, W
        """A residual branch through its DropPath and the adapter in ``slot`` (see ``TunedBlockMixin._branch``)."""
        if self._slot(slot) is None:
            return drop_path(y)
        return self._branch(slot, y.permute(0, 2, 3, 1), drop_path).permute(0, 3, 1, 2)


class TunedConvNeXtBlock(ConvNeXtBlock, _MapBlockMixin):
    """timm ``convnext.ConvNeXtBlock`` with adapter slots (class swapped in, never built)."""

    def forward(self, x: Tensor) -> Tensor:  # B, C, H, W
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.norm(x)
            x = self.mlp(x)
        else:
            x = x.permute(0, 2, 3, 1)
            x = self.norm(x)
            x = self.mlp(x)
            x = x.permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))

        shortcut = self.shortcut(shortcut)
        x = self._branch_map("mlp_out", x, self.drop_path) + shortcut
        parallel = self._slot("mlp_parallel")
        if parallel is not None:
            x = x + parallel(shortcut.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self._adapt_map("after_block", x)


class TunedBasicBlock(BasicBlock, _MapBlockMixin):
    """timm ``resnet.BasicBlock`` with the ``after_block`` slot (class swapped in, never built)."""

    def forward(self, x: Tensor) -> Tensor:  # B, C, H, W
        shortcut = x

        x = self.conv1(x)
        x = self.bn1(x)
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)

        x = self.conv2(x)
        x = self.bn2(x)

        if self.se is not None:
            x = self.se(x)

        if self.drop_path is not None:
            x = self.drop_path(x)

        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self._adapt_map("after_block", x)
        x = self.act2(x)

        return x


class TunedBottleneck(Bottleneck, _MapBlockMixin):
    """timm ``resnet.Bottleneck`` with the ``after_block`` slot (class swapped in, never built)."""

    def forward(self, x: Tensor) -> Tensor:  # B, C, H, W
        shortcut = x

        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)

        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)

        x = self.conv3(x)
        x = self.bn3(x)

        if self.se is not None:
            x = self.se(x)

        if self.drop_path is not None:
            x = self.drop_path(x)

        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self._adapt_map("after_block", x)
        x = self.act3(x)

        return x


def _final_act(block: nn.Module) -> nn.Module:
    """The activation after a ResNet block's residual add."""
    return block.act3 if isinstance(block, Bottleneck) else block.act2


def _final_act_out_of_place(model: nn.Module, blocks: Sequence[nn.Module]) -> None:
    """Run the final activation of the tuned ResNet blocks out of place: in place, it would overwrite
    Mona's output, which Mona's fused backward needs. The flag is restored by :func:`_final_act_restore`."""
    for block in blocks:
        act = _final_act(block)
        if getattr(act, "inplace", False):
            act.inplace = False
            block.__dict__["_monatune_inplace_act"] = True


def _final_act_restore(model: nn.Module) -> None:
    """Undo :func:`_final_act_out_of_place` (no ResNet block is tuned any more)."""
    for block in model.modules():
        if block.__dict__.pop("_monatune_inplace_act", False):
            _final_act(block).inplace = True


class DenseConvNeXt(ConvNeXt, DenseMixin):
    """A timm ConvNeXt returning its stage maps (class swapped in).

    ``out_indices`` are the stages returned (keys ``"i"``), each through its output norm ``norm{i}``
    (a LayerNorm over channels); ``out_channels`` and ``strides`` describe every stage.
    """

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":  # type: ignore[override]
        H, W = x.shape[-2:]
        last = self.strides[-1]
        x = self.stem(self._pad_to_patch(x, (last, last)))
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                s = self.strides[i]
                crop = x[:, :, : math.ceil(H / s), : math.ceil(W / s)]
                out[str(i)] = self._output(i, crop.permute(0, 2, 3, 1))  # B, C_i, H_i, W_i
        return out


class DenseResNet(ResNet, DenseMixin):
    """A timm ResNet returning ``layer1`` .. ``layer4`` (keys ``"0"`` .. ``"3"`` for ``out_indices``), no
    output norms (class swapped in)."""

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":  # type: ignore[override]
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))  # B, C, H/4, W/4
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            if i in self.out_indices:
                out[str(i)] = x
        return out


def build_dense_convnext(name: str, out_indices: Sequence[int] | None, kwargs: dict[str, Any]) -> DenseConvNeXt:
    """A timm ConvNeXt (V1 or V2) as a dense backbone: stage maps through ``norm{i}``, no head."""
    model = create_timm_model(name, pretrained=False, num_classes=0, **kwargs)
    if type(model) is not ConvNeXt:
        raise ValueError(f"{name!r} builds a timm {type(model).__name__}, not a ConvNeXt")
    swap_class(model, DenseConvNeXt)
    model.norm_pre = nn.Identity()  # the classifier's norms (and MLP) are not part of the dense backbone
    model.head.reset(0, reset_other=True)
    model._describe_stages([i["num_chs"] for i in model.feature_info], [i["reduction"] for i in model.feature_info],
                           out_indices)  # fmt: skip
    return model


def build_dense_resnet(name: str, out_indices: Sequence[int] | None, kwargs: dict[str, Any]) -> DenseResNet:
    """A timm ResNet / ResNeXt as a dense backbone: the four layers' maps, no classifier."""
    model = create_timm_model(name, pretrained=False, num_classes=0, **kwargs)
    if type(model) is not ResNet:
        raise ValueError(f"{name!r} builds a timm {type(model).__name__}, not a ResNet")
    swap_class(model, DenseResNet)
    stages = model.feature_info[1:]  # feature_info[0] is the stem
    model._describe_stages([i["num_chs"] for i in stages], [i["reduction"] for i in stages], out_indices, norms=False)
    return model


register_block(BlockRule(
    block=ConvNeXtBlock, tuned=TunedConvNeXtBlock, family="timm ConvNeXt",
    slots=("mlp_parallel", "mlp_out", "after_block"), grid="NCHW map", width=lambda b: b.conv_dw.out_channels,
    linears={"fc1": "mlp.fc1", "fc2": "mlp.fc2"},
))
register_block(BlockRule(
    block=BasicBlock, tuned=TunedBasicBlock, family="timm ResNet", slots=("after_block",), grid="NCHW map",
    width=lambda b: b.conv2.out_channels, attach=_final_act_out_of_place, detach=_final_act_restore,
))
register_block(BlockRule(
    block=Bottleneck, tuned=TunedBottleneck, family="timm ResNet", slots=("after_block",), grid="NCHW map",
    width=lambda b: b.conv3.out_channels, attach=_final_act_out_of_place, detach=_final_act_restore,
))
register_dense(DenseRule(family="timm ConvNeXt (convnext_*, convnextv2_*)", timm_modules=("convnext",),
                         build=build_dense_convnext, hierarchical=True))
register_dense(DenseRule(family="timm ResNet (resnet*, resnext*, wide_resnet*, seresnet*, ...)",
                         timm_modules=("resnet",), build=build_dense_resnet, hierarchical=True))
