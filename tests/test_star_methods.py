"""The STAR-MMRotate fork's Swin methods (``mmrotate/models/backbones/swin_*.py``), reachable with method options.

The references below are written from that fork's source: ``Lorand_Multi``/``Lorand`` (swin_lorand.py),
loralib's ``MergedLinear`` (lora_layers.py) and each backbone's freezing rule in ``init_weights``
(a substring of the parameter's mmdet name). Its adapter modules are never re-initialised after
the checkpoint loads, so their linears keep PyTorch's default init: ``init="default"``.
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import monatune
from monatune.adapters import Bottleneck, LoRA, LoRand, Mona, MonaOp
from monatune.tasks import ImageClassifier

SWIN = "swin_tiny_patch4_window7_224"
TINY = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
STAR = {  # what the STAR configs need, per method
    "mona": {"init": "default"},
    "adapter": {"init": "default"},
    "adaptformer": {"init": "default"},
    "lorand": {"branches": 4, "shared_kernel": False},
}


# ---------------------------------------------------------------- initialisation


def test_mona_default_init_is_torchs_linear_init():
    torch.manual_seed(5)
    mona = Mona(48, init="default")
    torch.manual_seed(5)  # the release builds the same modules in the same order
    project1, _, project2 = nn.Linear(48, 64), MonaOp(64), nn.Linear(64, 48)
    for ours, reference in ((mona.project1, project1), (mona.project2, project2)):
        assert torch.equal(ours.weight, reference.weight) and torch.equal(ours.bias, reference.bias)
    torch.manual_seed(5)
    released = Mona(48)  # the Mona release's: truncated normal, zero bias
    assert not torch.equal(released.project1.weight, project1.weight) and not released.project1.bias.any()


@pytest.mark.parametrize("scale, residual", [(1.0, True), (0.1, False)], ids=["adapter", "adaptformer"])
def test_bottleneck_default_init_is_torchs_linear_init(scale, residual):
    torch.manual_seed(7)
    adapter = Bottleneck(40, 64, 0.1, scale=scale, residual=residual, init="default")
    torch.manual_seed(7)
    project1, project2 = nn.Linear(40, 64), nn.Linear(64, 40)
    assert torch.equal(adapter.project1.weight, project1.weight) and torch.equal(adapter.project1.bias, project1.bias)
    assert torch.equal(adapter.project2.weight, project2.weight) and torch.equal(adapter.project2.bias, project2.bias)


@pytest.mark.parametrize("method", ["mona", "adapter", "adaptformer"])
def test_the_init_option_reaches_every_adapter_of_a_backbone(method):
    for init in ("default", "trunc_normal"):
        backbone = monatune.build_dense_backbone(SWIN, method, model_kwargs=TINY, init=init)
        linears = [m for m in backbone.modules() if isinstance(m, (Mona, Bottleneck))]
        assert len(linears) == {"mona": 16, "adapter": 16, "adaptformer": 8}[method]  # 8 blocks
        for module in linears:
            for linear in (module.project1, module.project2):
                bound = 1 / math.sqrt(linear.in_features)  # PyTorch's: U(-bound, bound) for weight and bias
                if init == "default":
                    assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.9 * bound
                    assert linear.bias.abs().max() <= bound and linear.bias.any()
                else:
                    assert not linear.bias.any() and abs(linear.weight.std().item() - 0.02) < 0.004


def test_bad_init_is_a_one_line_value_error():
    with pytest.raises(ValueError, match=r"mona option `init` must be one of 'trunc_normal', 'default', got 'kaiming'"):
        monatune.methods.resolve_method("mona", {"init": "kaiming"})
    with pytest.raises(ValueError, match="`init` must be one of"):
        Bottleneck(8, init="zeros")


# ---------------------------------------------------------------- LoRand and LoRA against the fork's code


def star_lorand_multi(x, A, g, B, bias):
    """``Lorand_Multi.forward``: weight = sum_i (A_i g_i B_i)^T."""
    weight = sum(torch.mm(torch.mm(A[i], g[i]), B[i]).t() for i in range(len(A)))
    return F.linear(x, weight, bias)


def test_lorand_with_a_kernel_per_projection_computes_the_forks_lorand():
    torch.manual_seed(0)
    dim = 24
    ours = LoRand(dim, rank=8, branches=4, shared_kernel=False)
    assert ours.up_kernel is not None and not torch.equal(ours.up_kernel, ours.kernel)
    x = torch.randn(2, 5, 7, dim)
    # Lorand(in_dim, 2): project1 = Lorand_Multi(C, C // 2, 4, 8), project2 = Lorand_Multi(C // 2, C, 4, 8)
    hidden = star_lorand_multi(x, ours.down_p, ours.kernel, ours.down_q, ours.down_bias)
    reference = x + star_lorand_multi(F.gelu(hidden), ours.up_p, ours.up_kernel, ours.up_q, ours.up_bias)
    torch.testing.assert_close(ours(x), reference)
    # the fork's parameter count: per projection 4 x (A + g + B) + bias
    c, m, k = dim, dim // 2, 8
    star_count = 4 * (c * k + k * k + k * m) + m + 4 * (m * k + k * k + k * c) + c
    assert sum(p.numel() for p in ours.parameters()) == star_count
    shared = LoRand(dim, rank=8, branches=4)  # the paper's (and default): one kernel per branch for both
    assert shared.up_kernel is None and sum(p.numel() for p in shared.parameters()) == star_count - 4 * k * k


def test_lorand_factors_start_as_the_forks_kaiming_uniform():
    torch.manual_seed(0)
    ours = LoRand(64, rank=8, branches=4, shared_kernel=False)
    # the fork's tensors: A (in, k), g (k, k), B (k, out); kaiming_uniform(a=sqrt 5) bound = 1 / sqrt(size(1))
    for factor in (ours.down_p, ours.kernel, ours.down_q, ours.up_p, ours.up_kernel, ours.up_q):
        bound = 1 / math.sqrt(factor.shape[-1])
        assert factor.abs().max() <= bound and factor.abs().max() > 0.8 * bound
    assert ours.down_bias.abs().max() <= 1 / math.sqrt(64) and ours.up_bias.abs().max() <= 1 / math.sqrt(32)


def test_lora_computes_loralibs_merged_linear_on_q_and_v():
    """The fork's SwinLoRA: ``MergedLinear(C, 3C, r=64, enable_lora=[True, False, True])``, alpha 1: no difference."""
    torch.manual_seed(0)
    dim, r = 16, 64
    qkv = nn.Linear(dim, 3 * dim)
    ours = LoRA(dim, 3 * dim, rank=r, alpha=1.0, num_slices=3, slices=(0, 2))
    nn.init.normal_(ours.lora_B)
    x = torch.randn(2, 9, dim)
    after_a = F.linear(x, ours.lora_A)  # MergedLinear.forward
    after_b = F.conv1d(after_a.transpose(-2, -1), ours.lora_B.unsqueeze(-1), groups=2).transpose(-2, -1)
    padded = torch.zeros(2, 9, 3 * dim)
    padded[..., :dim], padded[..., 2 * dim:] = after_b[..., :dim], after_b[..., dim:]
    reference = qkv(x) + padded * (1.0 / r)
    torch.testing.assert_close(ours(x, qkv(x)), reference)


# ---------------------------------------------------------------- what trains


def mmdet_name(name):
    """A timm Swin parameter's name in mmdet's SwinTransformer (the fork's backbones)."""
    name = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"stages.{int(m.group(1)) - 1}.downsample.", name)
    name = re.sub(r"^layers\.", "stages.", name.replace("patch_embed.proj.", "patch_embed.projection."))
    return name.replace(".attn.", ".attn.w_msa.").replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")


STAR_RULES = {  # each backbone's init_weights: parameters whose (mmdet) name ... stay trainable
    "full": lambda n: True,  # mmdet's SwinTransformer
    "fixed": lambda n: False,
    "bitfit": lambda n: "bias" in n,
    "norm": lambda n: "norm" in n,
    "partial-1": lambda n: "stages.3.blocks.1" in n,
    "mona": lambda n: "mona" in n,
    "adapter": lambda n: "adapter" in n,
    "adaptformer": lambda n: "adapter" in n,
    "lora": lambda n: "lora_" in n,
    "lorand": lambda n: "lorand" in n,
}


@pytest.mark.parametrize("method", list(STAR_RULES))
def test_the_backbone_parameters_that_train_are_the_forks(method):
    plain = monatune.build_dense_backbone(SWIN, model_kwargs=TINY, out_indices=[1, 2, 3])  # norm1..3, as the fork
    base = [n for n, _ in plain.named_parameters()]
    assert "stages.0.downsample.reduction.weight" in map(mmdet_name, base)
    assert "stages.3.blocks.1.ffn.layers.1.weight" in map(mmdet_name, base)
    tuned = monatune.build_dense_backbone(SWIN, method, model_kwargs=TINY, out_indices=[1, 2, 3], **STAR.get(method, {}))
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable & set(base) == {n for n in base if STAR_RULES[method](mmdet_name(n))}
    assert trainable - set(base) == {n for n, _ in tuned.named_parameters() if n not in base}  # every adapter tensor


# ---------------------------------------------------------------- per-method options in a task config


TASK_TINY = {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "img_size": 32, "patch_size": 2,
             "window_size": 4}  # fmt: skip


def task(**kwargs):
    torch.manual_seed(0)
    return ImageClassifier(SWIN, model_kwargs=TASK_TINY, num_classes=3, **kwargs)


def test_the_chosen_methods_options_come_from_the_table_updated_by_method_options():
    table = {"mona": {"init": "default", "bottleneck": 8}, "lorand": {"branches": 4, "shared_kernel": False}}
    module = task(method="mona", method_options={"bottleneck": 16}, method_options_by_method=table)
    assert module.method_options == {"init": "default", "bottleneck": 16}
    assert module.hparams["method_options"] == {"init": "default", "bottleneck": 16}  # saved as resolved
    assert module.hparams["method_options_by_method"] == table
    module.configure_model()
    monas = [m for m in module.model.modules() if isinstance(m, Mona)]
    assert monas and all(m.project1.out_features == 16 and m.project1.bias.any() for m in monas)  # PyTorch's init
    lorand = task(method="lorand", method_options={}, method_options_by_method=table)
    assert lorand.method_options == {"branches": 4, "shared_kernel": False}
    lorand.configure_model()
    assert all(m.up_kernel is not None and m.branches == 4 for m in lorand.model.modules() if isinstance(m, LoRand))
    # a checkpoint's hyperparameters rebuild the same options (resolving twice changes nothing)
    again = task(**{k: v for k, v in module.hparams.items() if k in ("method", "method_options", "method_options_by_method")})
    assert again.method_options == module.method_options


def test_without_the_table_nothing_changes():
    module = task(method="mona", method_options={"bottleneck": 16})
    assert module.method_options == {"bottleneck": 16} == module.hparams["method_options"]
    assert module.hparams["method_options_by_method"] is None
    assert task(method="lora").hparams["method_options"] is None  # as given
    table_for_others = task(method="lora", method_options=None, method_options_by_method={"mona": {"init": "default"}})
    assert table_for_others.method_options == {} and table_for_others.hparams["method_options"] is None


@pytest.mark.parametrize("table, match", [
    ({"lorand": {"kernels": 4}}, r"method_options_by_method\.lorand: unknown option\(s\) \['kernels'\] for method 'lorand'"),
    ({"mona": {"init": "xavier"}}, r"method_options_by_method\.mona: mona option `init` must be one of"),
    ({"monaa": {}}, r"method_options_by_method\.monaa: unknown tuning method 'monaa'"),
    ([("mona", {})], "`method_options_by_method` must map method names to their options"),
])  # fmt: skip
def test_every_entry_of_the_table_is_checked_whichever_method_runs(table, match):
    with pytest.raises(ValueError, match=match):
        task(method="lora", method_options_by_method=table)
