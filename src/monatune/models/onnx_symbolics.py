"""What the TorchScript ONNX exporter (``torch.onnx.export(..., dynamo=False)``) lacks for monatune's models.

``aten::_upsample_bicubic2d_aa``: antialiased bicubic resampling, which timm's ``resample_abs_pos_embed`` runs
whenever a ViT-family model (ViT, EVA-02, SAM ViT, ...) sees a grid other than its pretrained one, as every dense
backbone does. torch.onnx has no symbolic for it at any opset; ONNX has had the operator since opset 18 (``Resize``
with ``antialias=1``; PyTorch's kernel is Pillow's: cubic coefficient -0.5, weights outside the image excluded and
renormalised). Registered once, on ``import monatune``, for opset 18 and later; ONNX Runtime's outputs match
PyTorch's (tests/deploy/test_capture.py). The dynamo exporter translates the operator itself.
"""
from __future__ import annotations

import torch
from torch.onnx import symbolic_helper

__all__ = ["register"]

OP = "aten::_upsample_bicubic2d_aa"
OPSET = 18  # the first with Resize's ``antialias``


def _bicubic_aa(g, x, output_size, align_corners, scale_factors):  # noqa: ANN001 (torch.onnx's graph context)
    if symbolic_helper._is_none(output_size):  # F.interpolate(scale_factor=...): not what timm calls
        return symbolic_helper._unimplemented(OP, "a scale factor instead of an output size", x)
    shape = g.op("Shape", x)
    batch_channels = g.op("Slice", shape, g.op("Constant", value_t=torch.tensor([0])),
                          g.op("Constant", value_t=torch.tensor([2])))  # fmt: skip
    sizes = g.op("Concat", batch_channels, g.op("Cast", output_size, to_i=7), axis_i=0)  # 7: int64
    none = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    corners = symbolic_helper._maybe_get_const(align_corners, "b")
    return g.op("Resize", x, none, none, sizes, mode_s="cubic", antialias_i=1, cubic_coeff_a_f=-0.5,
                exclude_outside_i=1, coordinate_transformation_mode_s="align_corners" if corners else "half_pixel")


def register() -> None:
    """Register the symbolics above with ``torch.onnx`` (idempotent)."""
    torch.onnx.register_custom_op_symbolic(OP, _bicubic_aa, OPSET)
