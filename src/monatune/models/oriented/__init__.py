"""Oriented object detection: H2RBox-v2+ (horizontal-box supervised, PSC angles) on monatune's dense backbones.

- :mod:`.psc`: the phase-shifting angle coder;
- :mod:`.head`: the rotated FCOS head, its point assignment and the loss assembly;
- :mod:`.losses`: the losses' maths (projection IoU, centerness, symmetry);
- :mod:`.views`: normalising and batching images, the rotated/flipped self-supervised view;
- :mod:`.h2rbox`: the detector (training losses, inference) and :func:`build_h2rbox`.
"""
from .h2rbox import H2RBoxV2P, build_h2rbox
from .head import H2RBoxHead, fcos_targets, grid_points
from .psc import psc_decode, psc_encode
from .views import batch_images, make_views

__all__ = [
    "H2RBoxV2P", "build_h2rbox", "H2RBoxHead", "fcos_targets", "grid_points", "psc_decode", "psc_encode",
    "batch_images", "make_views",
]  # fmt: skip
