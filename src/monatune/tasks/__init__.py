"""Tasks: what a tuned backbone is trained to do (heads, losses, metrics)."""
from .classification import ImageClassifier
from .detection import ObjectDetector

__all__ = ["ImageClassifier", "ObjectDetector"]
