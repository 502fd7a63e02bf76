"""Oriented object detection on monatune's dense backbones: the detectors of the STAR-MMRotate release.

H2RBox-v2+ (horizontal-box supervised, PSC angles):

- :mod:`.psc`: the phase-shifting angle coder;
- :mod:`.head`: the rotated FCOS head, its point assignment and the loss assembly;
- :mod:`.losses`: the losses' maths (projection IoU, centerness, symmetry);
- :mod:`.views`: normalising and batching images, the rotated/flipped self-supervised view;
- :mod:`.h2rbox`: the detector (training losses, inference) and :func:`build_h2rbox`.

Rotated-box supervised detectors:

- :mod:`.coders`: mmrotate's box coders (``(cx, cy, w, h, angle)`` deltas, midpoint offsets) and the
  'oc' / le90 conversions;
- :mod:`.gaussian`: the KLD loss (Gaussian Kullback-Leibler divergence between boxes);
- :mod:`.retinanet`: the rotated RetinaNet and :func:`build_rotated_retinanet`;
- :mod:`.oriented_rpn`, :mod:`.rotated_roi_head`, :mod:`.oriented_rcnn`: Oriented R-CNN and
  :func:`build_oriented_rcnn`.
"""
from .coders import DeltaXYWHACoder, MidpointOffsetCoder, le90_to_oc, oc_to_le90
from .gaussian import kld_loss
from .h2rbox import H2RBoxV2P, build_h2rbox
from .head import H2RBoxHead, fcos_targets, grid_points
from .oriented_rcnn import OrientedRCNN, build_oriented_rcnn
from .psc import psc_decode, psc_encode
from .retinanet import RotatedRetinaNet, build_rotated_retinanet
from .views import batch_images, make_views

__all__ = [
    "H2RBoxV2P", "build_h2rbox", "H2RBoxHead", "fcos_targets", "grid_points", "psc_decode", "psc_encode",
    "batch_images", "make_views", "OrientedRCNN", "build_oriented_rcnn", "RotatedRetinaNet", "build_rotated_retinanet",
    "DeltaXYWHACoder", "MidpointOffsetCoder", "le90_to_oc", "oc_to_le90", "kld_loss",
]  # fmt: skip
