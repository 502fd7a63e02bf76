import sys
from pathlib import Path

import pytest
import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))  # for release_reference

TINY_SWIN = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_swin(num_classes: int = 5, **kwargs) -> torch.nn.Module:
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=num_classes, **TINY_SWIN, **kwargs)


def tiny_vit(num_classes: int = 5, **kwargs) -> torch.nn.Module:
    kwargs.setdefault("depth", 2)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **kwargs)
