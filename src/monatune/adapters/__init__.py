"""What each tuning method computes: plain ``nn.Module``s, no timm import."""
from .bottleneck import Bottleneck
from .lora import LoRA
from .lorand import LoRand
from .mona import Mona, MonaOp
from .ssf import SSF
from .vpt import Prompt, PromptCarry

__all__ = ["Mona", "MonaOp", "Bottleneck", "LoRA", "LoRand", "SSF", "Prompt", "PromptCarry"]
