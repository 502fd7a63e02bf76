"""Anchors as mmdetection 2.x's ``AnchorGenerator`` lays them out, on torchvision's ``AnchorGenerator``.

torchvision's generator differs from the release's in two ways that move anchors:

- it rounds the base anchors to whole pixels (a 45.25 x 22.63 anchor becomes 46 x 22); mmdet keeps them exact;
- it infers each level's stride as ``padded image size // feature map size``, which is not the
  stride on the coarse levels (an 800-pixel side has a 13-cell P6: 800 // 13 = 61, not 64); mmdet
  uses the configured strides.

:class:`MMDetAnchorGenerator` fixes both; the anchor order (position-major, then ratio, then
scale) and the centre offset 0 already agree.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

__all__ = ["MMDetAnchorGenerator"]


class MMDetAnchorGenerator(AnchorGenerator):
    """mmdet's ``AnchorGenerator(strides, ratios, scales | octave_base_scale + scales_per_octave)``.

    Anchor sides are ``stride * scale`` per level (unrounded), for each ratio ``h / w``.

    Args:
        strides: Stride of each feature level (the release's RPN: 4, 8, 16, 32, 64; RetinaNet: 8 ... 128).
        ratios: Height / width ratios.
        scales: Scales of the stride (the RPN: ``(8,)``); or give ``octave_base_scale`` and
            ``scales_per_octave`` (RetinaNet: 4 and 3, i.e. ``4 * 2 ** (k / 3)``).
        octave_base_scale: See ``scales``.
        scales_per_octave: See ``scales``.

    Example:
        >>> rpn_anchors = MMDetAnchorGenerator((4, 8, 16, 32, 64), (0.5, 1.0, 2.0), scales=(8,))
        >>> retina_anchors = MMDetAnchorGenerator((8, 16, 32, 64, 128), (0.5, 1.0, 2.0), octave_base_scale=4, scales_per_octave=3)
    """

    def __init__(
        self,
        strides: Sequence[int],
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
        *,
        scales: Sequence[float] | None = None,
        octave_base_scale: float | None = None,
        scales_per_octave: int | None = None,
    ) -> None:
        if (scales is None) == (octave_base_scale is None or scales_per_octave is None):
            raise ValueError("give either `scales` or both `octave_base_scale` and `scales_per_octave`")
        if scales is None:
            scales = [octave_base_scale * 2 ** (k / scales_per_octave) for k in range(scales_per_octave)]
        self.strides = [int(s) for s in strides]
        sizes = tuple(tuple(float(stride * s) for s in scales) for stride in self.strides)
        super().__init__(sizes, (tuple(float(r) for r in ratios),) * len(self.strides))

    def generate_anchors(
        self,
        scales: Sequence[float],
        aspect_ratios: Sequence[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device("cpu"),
    ) -> Tensor:
        scales_t = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales_t[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales_t[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2  # not rounded (torchvision rounds)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"{len(feature_maps)} feature maps for {len(self.strides)} anchor strides {self.strides}")
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        self.grid_sizes = [(int(h), int(w)) for h, w in grid_sizes]  # of the last call, for valid_flags
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]

    def valid_flags(self, pad_shape: tuple[int, int], device: torch.device | None = None) -> Tensor:
        """mmdet's ``valid_flags``: anchors at positions inside one image's padded shape (the last call's grids).

        In a batch padded to its largest image, the positions beyond an image's own ``pad_shape``
        (its size rounded up to the size divisor) hold no image and take no part in training.
        """
        flags = []
        for (h, w), stride in zip(self.grid_sizes, self.strides):
            vh, vw = min(-(-pad_shape[0] // stride), h), min(-(-pad_shape[1] // stride), w)
            valid = torch.zeros(h, w, dtype=torch.bool, device=device)
            valid[:vh, :vw] = True
            flags.append(valid.reshape(-1, 1).expand(-1, self.num_anchors_per_location()[0]).reshape(-1))
        return torch.cat(flags)
