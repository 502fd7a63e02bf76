"""What each tuning method computes: plain ``nn.Module``s, no timm import."""
from .mona import Mona, MonaOp

__all__ = ["Mona", "MonaOp"]
