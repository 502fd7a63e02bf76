"""Data: local data sets, their Lightning data modules, resumable loaders."""
from .classification import (
    DEFAULT_SPLITS,
    FORMATS,
    VOC_CLASSES,
    BadAnnotationError,
    BadImageError,
    ClassificationDataset,
    build_classification_dataset,
    detect_format,
)
from .classification_data import ClassificationData, ImageFiles, classification_transforms
from .detection import (
    ON_BAD_ANNOTATION,
    DetectionDataset,
    collate_detection,
    detection_transforms,
    read_coco,
    read_voc,
)
from .detection_data import DEFAULT_DETECTION_SPLITS, DetectionData
from .oriented import (
    DOTA_CLASSES,
    STAR_CLASSES,
    OrientedDataset,
    collate_oriented,
    oriented_transforms,
    read_dota,
    read_oriented,
    read_star,
)
from .oriented_data import OrientedData
from .segmentation import ADE20K_CLASSES, SegmentationDataset, read_ade20k, read_masks, segmentation_transforms
from .segmentation_data import SegmentationData
from .loading import EpochSampler, ResumableLoader, SeededDataset, ShardSampler

__all__ = [
    "OrientedData",
    "OrientedDataset",
    "read_oriented",
    "read_dota",
    "read_star",
    "oriented_transforms",
    "collate_oriented",
    "DOTA_CLASSES",
    "STAR_CLASSES",
    "SegmentationData",
    "SegmentationDataset",
    "read_ade20k",
    "read_masks",
    "segmentation_transforms",
    "ADE20K_CLASSES",
    "DetectionData",
    "DEFAULT_DETECTION_SPLITS",
    "DetectionDataset",
    "read_coco",
    "read_voc",
    "detection_transforms",
    "collate_detection",
    "ON_BAD_ANNOTATION",
    "ClassificationData",
    "ImageFiles",
    "classification_transforms",
    "EpochSampler",
    "ResumableLoader",
    "SeededDataset",
    "ShardSampler",
    "DEFAULT_SPLITS",
    "FORMATS",
    "VOC_CLASSES",
    "BadAnnotationError",
    "BadImageError",
    "ClassificationDataset",
    "build_classification_dataset",
    "detect_format",
]
