"""Rotated-box and polygon operations torchvision does not have (le90 conversions, rotated NMS, polygon IoU).

- :mod:`.boxes`: le90 <-> torchvision ``CXCYWHR``, corners, circumscribed boxes, minimum-area rectangles of
  polygons, rotated IoU (torchvision's kernel).
- :mod:`.nms`: greedy rotated NMS, plain and per category.
- :mod:`.polygons`: exact polygon area, IoU against convex quadrilaterals and IoF against a window.
- :mod:`.roi_align_rotated`: mmcv's rotated RoIAlign with ``grid_sample``, mmrotate's multi-level RoI extractor.
"""
from .boxes import (
    cxcywhr_to_le90,
    le90_to_cxcywhr,
    le90_to_hbb,
    le90_to_polygons,
    norm_le90,
    polygons_to_le90,
    rotated_box_iou,
)
from .nms import batched_rotated_nms, rotated_nms
from .polygons import polygon_area, polygon_iof, polygon_iou
from .roi_align_rotated import MultiScaleRotatedRoIAlign, roi_align_rotated

__all__ = [
    "MultiScaleRotatedRoIAlign", "batched_rotated_nms", "cxcywhr_to_le90", "le90_to_cxcywhr", "le90_to_hbb",
    "le90_to_polygons", "norm_le90", "polygon_area", "polygon_iof", "polygon_iou", "polygons_to_le90",
    "roi_align_rotated", "rotated_box_iou", "rotated_nms",
]  # fmt: skip
