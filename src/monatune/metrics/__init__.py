"""Evaluation metrics computed exactly as the reference tools do.

- :class:`VOCMeanAveragePrecision`: Pascal VOC mAP@0.5 (the VOC devkit's and mmdetection's).
- :class:`COCOMeanAveragePrecision`: COCO box / mask AP, by pycocotools' ``COCOeval`` itself.
- :class:`RotatedMeanAveragePrecision`: oriented-box mAP@0.5 (mmrotate's ``eval_rbbox_map``);
  :func:`dota_devkit_map` the DOTA devkit's Task1 mAP, :func:`write_task1` the DOTA server's submission files.
"""
from .coco import COCOMeanAveragePrecision
from .rotated import (
    RotatedMeanAveragePrecision,
    dota_devkit_map,
    le90_to_submission_polygons,
    task1_detections,
    write_task1,
)
from .voc import AP_METHODS, VOCMeanAveragePrecision

__all__ = [
    "AP_METHODS", "COCOMeanAveragePrecision", "RotatedMeanAveragePrecision", "VOCMeanAveragePrecision",
    "dota_devkit_map", "le90_to_submission_polygons", "task1_detections", "write_task1",
]  # fmt: skip
