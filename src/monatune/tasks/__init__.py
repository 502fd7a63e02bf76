"""Tasks: what a tuned backbone is trained to do (heads, losses, metrics)."""
from .classification import ImageClassifier
from .detection import ObjectDetector
from .oriented import OrientedDetector
from .segmentation import SemanticSegmenter

__all__ = ["ImageClassifier", "ObjectDetector", "OrientedDetector", "SemanticSegmenter"]
