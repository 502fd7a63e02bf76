"""Tiny timm models the tests build (imported by name: ``from tiny_models import tiny_swin``).

Kept out of conftest.py: with a conftest.py in a sub-folder too (tests/engine), ``from conftest
import ...`` would find whichever conftest pytest loaded last.
"""
import timm
import torch

TINY_SWIN = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def tiny_swin(num_classes: int = 5, **kwargs) -> torch.nn.Module:
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=num_classes, **TINY_SWIN, **kwargs)


def tiny_vit(num_classes: int = 5, **kwargs) -> torch.nn.Module:
    kwargs.setdefault("depth", 2)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **kwargs)
