"""Several named adapters on one backbone (add, list, switch, disable, delete, save/load by name) and merging."""
import copy

import pytest
import torch
from tiny_models import TINY_SWIN, tiny_swin, tiny_vit
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

import monatune
from monatune import build_dense_backbone


def _perturb(model):
    """Stand-in for training: every trainable tensor moves."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


X = torch.randn(2, 3, 56, 56)


def test_switching_changes_the_output_and_switching_back_restores_it_exactly():
    base = tiny_swin(img_size=56).eval()
    plain = base(X)
    model = copy.deepcopy(base)
    storages = {n: p.data_ptr() for n, p in model.named_parameters()}
    outputs = {}
    for name, method, options in [("mona", "mona", {}), ("lora", "lora", {"rank": 4}), ("bias", "bitfit", {})]:
        monatune.apply(model, method, adapter_name=name, **options)
        monatune.set_active_adapter(model, name)
        others = [o for o in ("mona", "lora", "bias") if o != name]
        assert not any(f".{o}." in n for n, p in model.named_parameters() if p.requires_grad for o in others)
        _perturb(model)  # trains this adapter, its head, and (bitfit) the biases in place
        outputs[name] = model(X)
    assert monatune.list_adapters(model) == {
        "mona": {"method": "mona", "options": {"bottleneck": 64, "kernel_sizes": (3, 5, 7), "dropout": 0.1, "init": "trunc_normal"}, "active": False, "merged": False},
        "lora": {"method": "lora", "options": {"rank": 4, "alpha": 1.0, "dropout": 0.0, "modules": ("q", "v")}, "active": False, "merged": False},
        "bias": {"method": "bitfit", "options": {}, "active": True, "merged": False},
    }
    assert not torch.allclose(outputs["mona"], outputs["lora"]) and not torch.allclose(outputs["lora"], outputs["bias"])
    for name in ["mona", "bias", "lora", "mona", "bias"]:
        monatune.set_active_adapter(model, name)
        assert monatune.active_adapter(model) == name
        assert torch.equal(model(X), outputs[name]), name
    # Only the active adapter trains: its modules, the head, its in-place weights.
    monatune.set_active_adapter(model, "lora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora.lora." in n or n.startswith("head.")}
    # Disabled: the base model, bit for bit, and nothing trains.
    monatune.disable_adapters(model)
    assert monatune.active_adapter(model) is None
    assert torch.equal(model(X), plain)
    assert not any(p.requires_grad for p in model.parameters())
    # One copy of the backbone: the base tensors are the same storages, copies only of what trains in place.
    assert all(p.data_ptr() == storages[n] for n, p in model.named_parameters() if n in storages)
    state = monatune.get_state(model)
    in_place = {n for n, _ in model.named_parameters() if ("bias" in n or n.startswith("head.")) and ".mona." not in n}
    assert set(state.pristine) <= in_place
    assert sum(t.numel() for t in state.pristine.values()) < 0.05 * sum(p.numel() for p in base.parameters())
    # Delete one; the others are untouched.
    monatune.set_active_adapter(model, "lora")
    monatune.remove_adapter(model, "lora")
    assert list(monatune.list_adapters(model)) == ["mona", "bias"]
    assert not any(".lora." in n for n, _ in model.named_parameters())
    for name in ["mona", "bias"]:
        monatune.set_active_adapter(model, name)
        assert torch.equal(model(X), outputs[name])
    monatune.unapply(model)
    assert torch.equal(model(X), plain)
    assert all(type(m) is SwinTransformerBlock for m in model.modules() if isinstance(m, SwinTransformerBlock))


def test_save_and_load_each_adapter_by_name(tmp_path):
    base = tiny_swin(img_size=56).eval()
    model = copy.deepcopy(base)
    outputs = {}
    for name, method in [("a", "adapter"), ("b", "bitfit"), ("c", "norm")]:
        monatune.apply(model, method, adapter_name=name)
        monatune.set_active_adapter(model, name)
        _perturb(model)
        outputs[name] = model(X)
    monatune.set_active_adapter(model, "a")
    for name in "abc":  # "b" and "c" are inactive: their in-place weights come from where they were put aside
        monatune.save_adapter(model, tmp_path / name, adapter_name=name)
    assert torch.equal(model(X), outputs["a"])  # saving changed nothing
    served = copy.deepcopy(base)
    for name in "cab":
        monatune.load_adapter(served, tmp_path / name)
        assert monatune.active_adapter(served) == name
        assert torch.equal(served(X), outputs[name]), name
    for name in "abc":
        monatune.set_active_adapter(served, name)
        assert torch.equal(served(X), outputs[name]), name
    # Loaded under another name beside the same one.
    monatune.load_adapter(served, tmp_path / "a", adapter_name="a2")
    assert torch.equal(served(X), outputs["a"])
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        monatune.apply(served, "mona", adapter_name="a")


def test_full_cannot_share_a_backbone():
    model = monatune.apply(tiny_swin(img_size=56), "mona")
    with pytest.raises(ValueError, match="full fine-tuning changes every weight"):
        monatune.apply(model, "full", adapter_name="f")
    assert list(monatune.list_adapters(model)) == ["default"]
    model = monatune.apply(tiny_swin(img_size=56), "full")
    with pytest.raises(ValueError, match="full fine-tuning changes every weight"):
        monatune.apply(model, "mona", adapter_name="m")
    with pytest.raises(ValueError, match="no base model to switch to"):
        monatune.disable_adapters(model)


# ---------------------------------------------------------------- merging


def _models():
    return [
        ("swin-cls", tiny_swin(img_size=56).eval(), torch.randn(2, 3, 56, 56)),
        ("vit-cls", tiny_vit(img_size=32, reg_tokens=2).eval(), torch.randn(2, 3, 32, 32)),
        (
            "swin-dense",
            build_dense_backbone("swin_tiny_patch4_window7_224", model_kwargs=dict(TINY_SWIN)).eval(),
            torch.randn(1, 3, 45, 61),
        ),
    ]


def _flat(out):
    return torch.cat([o.flatten() for o in out.values()]) if isinstance(out, dict) else out.flatten()


@pytest.mark.parametrize("method,options", [("lora", {"modules": ("q", "k", "v", "proj", "fc1", "fc2")}), ("lora", {}), ("ssf", {})])
def test_merged_and_unmerged_outputs_agree_and_unmerge_is_exact(method, options):
    for label, base, x in _models():
        plain = _flat(base(x))
        model = monatune.apply(copy.deepcopy(base), method, head=None if "dense" in label else "auto", **options)
        _perturb(model)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        tuned = _flat(model(x))
        assert not torch.allclose(tuned, plain, atol=1e-4), label
        monatune.merge_adapter(model)
        assert monatune.list_adapters(model)["default"]["merged"]
        calls = []
        for _, _, adapter in monatune.adapter_modules(model):
            adapter.register_forward_hook(lambda *a: calls.append(1))
        merged = _flat(model(x))
        assert not calls, "a merged adapter still runs"
        assert torch.allclose(merged, tuned, rtol=1e-4, atol=1e-5), (label, (merged - tuned).abs().max())
        assert not any(p.requires_grad for n, p in model.named_parameters() if f".{method}." in n)
        monatune.unmerge_adapter(model)
        assert model.state_dict().keys() == weights.keys()
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()), label
        assert torch.equal(_flat(model(x)), tuned)


def test_unapply_with_merge_gives_a_plain_model_with_the_adapters_effect():
    for method in ("lora", "ssf", "bitfit", "norm"):
        base = tiny_swin(img_size=56).eval()
        model = monatune.apply(copy.deepcopy(base), method)
        _perturb(model)
        tuned = model(X)
        monatune.unapply(model, merge=True)
        assert not monatune.is_tuned(model)
        assert all(type(m) is type(b) for m, b in zip(model.modules(), base.modules()))
        assert not any(k.split(".")[-2] in ("lora", "ssf") or ".lora." in k or ".ssf." in k for k in model.state_dict())
        assert torch.allclose(model(X), tuned, rtol=1e-4, atol=1e-5), method
    # SSF after a bias-free linear (patch merging's reduction) gives it a bias when merged.
    assert model.layers[1].downsample.reduction.bias is None  # norm: untouched
    model = monatune.apply(tiny_swin(img_size=56).eval(), "ssf")
    monatune.unapply(model, merge=True)
    assert isinstance(model.layers[1].downsample.reduction.bias, nn.Parameter)


def test_methods_that_cannot_merge_say_so_and_merged_adapters_must_unmerge_before_switching():
    model = monatune.apply(tiny_swin(img_size=56), "mona")
    with pytest.raises(ValueError, match="mona is not linear in the weights and cannot be merged"):
        monatune.merge_adapter(model)
    monatune.apply(model, "lora", adapter_name="lora")
    monatune.set_active_adapter(model, "lora")
    monatune.merge_adapter(model)
    with pytest.raises(ValueError, match="adapter 'lora' is merged into the weights; call unmerge_adapter"):
        monatune.set_active_adapter(model, "default")
    monatune.unmerge_adapter(model)
    monatune.set_active_adapter(model, "default")
    monatune.merge_adapter(monatune.apply(tiny_swin(img_size=56), "bitfit"))  # in place already: nothing to do
