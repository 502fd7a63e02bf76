"""Adapter files map block adapters by position onto a model whose blocks have other names."""
import copy

import pytest
import torch
from tiny_models import tiny_vit
from torch import nn

import monatune


class Wrapped(nn.Module):
    """The same ViT under another name, as another package's model would name its blocks."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.encoder = vit

    def forward(self, x):
        return self.encoder(x)


def _saved(tmp_path, method="mona"):
    torch.manual_seed(0)
    base = tiny_vit(img_size=32).eval()
    tuned = monatune.apply(copy.deepcopy(base), method, head=None)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    monatune.save_adapter(tuned, tmp_path / "a")
    return base, tuned


def test_block_adapters_load_by_position_into_blocks_with_other_names(tmp_path):
    base, tuned = _saved(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    target = Wrapped(copy.deepcopy(base)).eval()
    with pytest.raises(ValueError, match="blocks have other names .*'blocks.0' is 'encoder.blocks.0' here.*check_base=False"):
        monatune.load_adapter(target, tmp_path / "a")
    assert not monatune.is_tuned(target)  # the failed load left it as it was
    monatune.load_adapter(target, tmp_path / "a", check_base=False)
    with torch.no_grad():
        assert torch.equal(target(x), tuned(x))


def test_only_block_slots_map_and_other_block_counts_refuse(tmp_path):
    _, _ = _saved(tmp_path, "lora")  # LoRA's tensors live in layers inside the blocks: not mapped
    with pytest.raises(ValueError, match="does not fit this model"):
        monatune.load_adapter(Wrapped(tiny_vit(img_size=32)), tmp_path / "a", check_base=False)
    _saved(tmp_path)
    with pytest.raises(ValueError, match="does not fit this model"):
        monatune.load_adapter(Wrapped(tiny_vit(img_size=32, depth=3)), tmp_path / "a", check_base=False)
