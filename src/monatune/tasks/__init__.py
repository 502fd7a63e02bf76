"""Tasks: what a tuned backbone is trained to do (heads, losses, metrics)."""
from .classification import ImageClassifier

__all__ = ["ImageClassifier"]
