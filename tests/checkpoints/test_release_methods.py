"""Checkpoints of the release's comparison methods (Adapter, AdaptFormer, LoRA, BitFit) convert to adapters."""
import copy
import re

import pytest
import torch
from tiny_models import TINY_SWIN

import monatune
from monatune import build_dense_backbone, convert_release_checkpoint
from monatune.cli import main

# How the release names each method's tensors, written out by hand (the inverse of the converter).
TO_RELEASE = {
    "adapter": [(r"\.attn_out\.default\.", ".my_module_1."), (r"\.mlp_out\.default\.", ".my_module_2.")],
    "adaptformer": [(r"\.mlp_parallel\.default\.", ".my_module_1.")],
    "lora": [(r"\.qkv\.lora\.default\.lora_", ".qkv.lora_")],
    "bitfit": [],
}


def _release_file(tuned, method, path):
    state = {}
    for k, v in tuned.state_dict().items():
        for pattern, repl in TO_RELEASE[method]:
            k = re.sub(pattern, repl, k)
        state[f"backbone.{k}"] = v
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(4, 4, 1, 1)  # the detector's other parts
    torch.save({"meta": {"epoch": 12}, "state_dict": state}, path)


@pytest.mark.parametrize("method", list(TO_RELEASE))
def test_release_checkpoints_of_each_method_convert(tmp_path, method):
    pretrained = build_dense_backbone("swin_tiny_patch4_window7_224", model_kwargs=TINY_SWIN).eval()
    tuned = monatune.apply(copy.deepcopy(pretrained), method, head=None)
    with torch.no_grad():  # stand-in for the release's training
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    _release_file(tuned, method, tmp_path / "release.pth")
    out = tmp_path / "adapter"
    assert main(["convert", str(tmp_path / "release.pth"), str(out), "--model", "swin_tiny_patch4_window7_224",
                 "--method", method, "--model-kwargs", '{"embed_dim": 32, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8]}']) == 0
    served = monatune.load_adapter(copy.deepcopy(pretrained), out)
    x = torch.randn(1, 3, 64, 80)
    for a, b in zip(served(x).values(), tuned(x).values()):
        assert torch.equal(a, b)


def test_a_checkpoint_of_another_method_is_refused(tmp_path):
    pretrained = build_dense_backbone("swin_tiny_patch4_window7_224", model_kwargs=TINY_SWIN)
    _release_file(monatune.apply(copy.deepcopy(pretrained), "adapter", head=None), "adapter", tmp_path / "a.pth")
    with pytest.raises(ValueError, match="my_module_2.* has no place in a backbone tuned with adaptformer"):
        convert_release_checkpoint(tmp_path / "a.pth", tmp_path / "out", "swin_tiny_patch4_window7_224",
                                   method="adaptformer", model_kwargs=dict(TINY_SWIN))
    assert not (tmp_path / "out").exists()
