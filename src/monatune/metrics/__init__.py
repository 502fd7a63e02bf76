"""Evaluation metrics computed exactly as the reference tools do.

- :class:`VOCMeanAveragePrecision`: Pascal VOC mAP@0.5 (the VOC devkit's and mmdetection's).
- :class:`COCOMeanAveragePrecision`: COCO box / mask AP, by pycocotools' ``COCOeval`` itself.
"""
from .coco import COCOMeanAveragePrecision
from .voc import AP_METHODS, VOCMeanAveragePrecision

__all__ = ["AP_METHODS", "COCOMeanAveragePrecision", "VOCMeanAveragePrecision"]
