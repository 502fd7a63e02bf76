"""Adapter-only checkpoints: exact round trip, nothing of the base in the file, atomic writes, refusals."""
import copy
import json
import os

import pytest
import torch
from tiny_models import tiny_swin, tiny_vit
from safetensors.torch import load_file

import monatune
from monatune.checkpoints.adapter import CONFIG_NAME, WEIGHTS_NAME


def _trained(model_factory=tiny_swin, **apply_kwargs):
    base = model_factory().eval()
    tuned = monatune.apply(copy.deepcopy(base), "mona", **apply_kwargs)
    with torch.no_grad():  # stand-in for training: every trainable tensor moves
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return base, tuned


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: type(m) for n, m in model.named_modules()}


@pytest.mark.parametrize("factory", [tiny_swin, tiny_vit])
def test_round_trip_is_bit_exact_and_holds_no_backbone_tensor(tmp_path, factory):
    base, tuned = _trained(factory)
    monatune.save_adapter(tuned, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == [CONFIG_NAME, WEIGHTS_NAME]
    saved = load_file(tmp_path / "a" / WEIGHTS_NAME)
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert {k.replace(".after_attn.", ".after_attn.default.").replace(".after_mlp.", ".after_mlp.default.") for k in saved} == trainable
    loaded = monatune.load_adapter(copy.deepcopy(base), tmp_path / "a")
    for (k, v), (k2, v2) in zip(tuned.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(loaded.eval()(x), tuned.eval()(x))
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert config["method"] == "mona" and config["options"] == {
        "bottleneck": 64, "kernel_sizes": [3, 5, 7], "dropout": 0.1, "init": "trunc_normal"}  # fmt: skip
    assert config["num_parameters"] == sum(v.numel() for v in saved.values())


def test_options_pattern_placement_and_fp16(tmp_path):
    import timm

    base = timm.create_model("convnext_atto", pretrained=False, num_classes=3).eval()
    tuned = monatune.apply(copy.deepcopy(base), "mona", targets=r"stages\.[23]", bottleneck=16, kernel_sizes=(3, 5))
    monatune.save_adapter(tuned, tmp_path / "c", dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in load_file(tmp_path / "c" / WEIGHTS_NAME).values())
    loaded = monatune.load_adapter(copy.deepcopy(base), tmp_path / "c")
    spec = monatune.get_state(loaded).adapters["default"]
    assert (spec.targets, spec.options["bottleneck"], spec.options["kernel_sizes"]) == (r"stages\.[23]", 16, (3, 5))
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(loaded.eval()(x), tuned.eval()(x), atol=1e-2)


def test_weights_from_another_save_are_refused(tmp_path):
    base, tuned = _trained()
    monatune.save_adapter(tuned, tmp_path / "a")
    _, other = _trained()
    monatune.save_adapter(other, tmp_path / "b")
    os.replace(tmp_path / "b" / WEIGHTS_NAME, tmp_path / "a" / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="do not belong together"):
        monatune.load_adapter(copy.deepcopy(base), tmp_path / "a")


def test_failed_loads_leave_the_model_unchanged(tmp_path):
    base, tuned = _trained()
    monatune.save_adapter(tuned, tmp_path / "a")

    other_weights = tiny_swin().eval()  # same architecture, different base weights
    before = _snapshot(other_weights)
    with pytest.raises(ValueError, match="frozen base weights differ.*fingerprint"):
        monatune.load_adapter(other_weights, tmp_path / "a")
    after = _snapshot(other_weights)
    assert after[1] == before[1] and not monatune.is_tuned(other_weights)
    assert list(after[0]) == list(before[0]) and all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    monatune.load_adapter(other_weights, tmp_path / "a", check_base=False)  # allowed when asked for

    bigger = tiny_swin(num_classes=7).eval()  # same name, another head: shapes differ
    before = _snapshot(bigger)
    with pytest.raises(ValueError, match=r"does not fit.*wrong shape.*head\.fc\.weight \(5, 256\) in the file, \(7, 256\)"):
        monatune.load_adapter(bigger, tmp_path / "a")
    assert _snapshot(bigger)[1] == before[1] and not monatune.is_tuned(bigger)

    vit = tiny_vit().eval()
    with pytest.raises(ValueError, match="trained on swin_tiny_patch4_window7_224, but the model is vit_tiny_patch16_224"):
        monatune.load_adapter(vit, tmp_path / "a")


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    base, tuned = _trained()
    monatune.save_adapter(tuned, tmp_path / "a")
    tuned_again = monatune.apply(copy.deepcopy(base), "mona", targets=r"layers\.3", layout="NHWC", adapter_name="x")
    monatune.remove_adapter(tuned_again, "x")
    # A file that lacks one tensor and has a stray one (rewritten consistently, as a buggy tool might).
    from monatune.atomic import write_file
    from monatune.checkpoints.adapter import read_adapter
    import hashlib
    from safetensors.torch import save

    config, tensors = read_adapter(tmp_path / "a")
    tensors.pop("layers.1.blocks.0.after_mlp.gamma")
    tensors["layers.9.blocks.0.after_mlp.gamma"] = torch.zeros(3)
    blob = save(tensors)
    config["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    write_file(tmp_path / "a" / WEIGHTS_NAME, blob)
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(config))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"missing \(1\): \['layers.1.blocks.0.after_mlp.gamma'\]; unexpected \(1\): \['layers.9"):
        monatune.load_adapter(model, tmp_path / "a")
    assert not monatune.is_tuned(model)


def test_loading_into_an_already_tuned_model_with_other_options_is_refused(tmp_path):
    base, tuned = _trained()
    monatune.save_adapter(tuned, tmp_path / "a")
    model = monatune.apply(copy.deepcopy(base), "mona", bottleneck=32)
    with pytest.raises(ValueError, match="load it under another `adapter_name`"):
        monatune.load_adapter(model, tmp_path / "a")
    monatune.load_adapter(model, tmp_path / "a", adapter_name="second")  # a second adapter, one backbone
    assert sorted(monatune.get_state(model).adapters) == ["default", "second"]
    same = monatune.apply(copy.deepcopy(base), "mona")  # same method and options: loads in place
    monatune.load_adapter(same, tmp_path / "a")
    assert torch.equal(same.layers[0].blocks[0].after_attn.default.gamma, tuned.layers[0].blocks[0].after_attn.default.gamma)


@pytest.mark.parametrize("make,match", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "adapter_config.json' is missing"),
    (lambda p: (p.mkdir(), (p / CONFIG_NAME).write_text("{"), (p / WEIGHTS_NAME).write_bytes(b"")), "not valid JSON"),
    (lambda p: (p.mkdir(), (p / CONFIG_NAME).write_text("{}"), (p / WEIGHTS_NAME).write_bytes(b"")), "not a monatune adapter config"),
])
def test_bad_adapter_directories(tmp_path, make, match):
    make(tmp_path / "bad")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        monatune.load_adapter(tiny_swin(), tmp_path / "bad")


def test_save_needs_a_tuned_model(tmp_path):
    with pytest.raises(ValueError, match="no monatune adapters"):
        monatune.save_adapter(tiny_swin(), tmp_path / "a")


@pytest.mark.slow
def test_swin_base_mona_adapter_file_is_at_most_15_mb(tmp_path):
    backbone = monatune.build_dense_backbone("swin_base_patch4_window7_224", "mona")
    monatune.save_adapter(backbone, tmp_path / "b")
    size = (tmp_path / "b" / WEIGHTS_NAME).stat().st_size
    assert 3_667_456 * 4 <= size <= 15_000_000


def _structure(model):
    """Everything a failed load must leave as it was: classes, tensors, hooks, attributes, what trains."""
    modules = [(n, type(m), sorted(m._modules), len(m._forward_hooks), len(m._forward_pre_hooks),
                sorted(k for k in m.__dict__ if k in ("token_grid", "active_adapter", "qkv_bias_separate")))
               for n, m in model.named_modules()]  # fmt: skip
    state = monatune.get_state(model)
    return modules, {k: v.clone() for k, v in model.state_dict().items()}, \
        [(n, p.requires_grad) for n, p in model.named_parameters()], \
        (sorted(state.adapters), list(state.swapped), list(state.attrs_changed), state.attached, sorted(state.pristine))


@pytest.mark.parametrize("factory,first,second", [
    (tiny_swin, {"method": "mona"}, {"method": "lora", "rank": 4}),
    (tiny_vit, {"method": "lora", "rank": 4}, {"method": "mona"}),
    (tiny_swin, {"method": "bitfit"}, {"method": "adapter"}),
])  # fmt: skip
def test_a_failed_load_into_a_tuned_model_leaves_it_exactly_as_it_was(tmp_path, factory, first, second):
    base = factory().eval()
    other = monatune.apply(copy.deepcopy(base), **second)
    monatune.save_adapter(other, tmp_path / "a")
    model = monatune.apply(factory().eval(), **first)  # other base weights: the fingerprint check fails
    before = _structure(model)
    x = torch.randn(1, 3, 224, 224)
    out = model(x)
    with pytest.raises(ValueError, match="frozen base weights differ"):
        monatune.load_adapter(model, tmp_path / "a", adapter_name="second")
    after = _structure(model)
    assert after[0] == before[0]  # no block left in a tuned class with an empty adapter bank
    assert after[1].keys() == before[1].keys() and all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    assert after[2:] == before[2:]
    assert torch.equal(model(x), out)


def test_integer_tensors_and_newer_or_incomplete_configs_are_refused(tmp_path):
    import hashlib

    from safetensors.torch import save

    from monatune.atomic import write_file
    from monatune.checkpoints.adapter import read_adapter

    base, tuned = _trained()
    monatune.save_adapter(tuned, tmp_path / "a")
    config, tensors = read_adapter(tmp_path / "a")

    def rewrite(config, tensors):
        blob = save(tensors)
        write_file(tmp_path / "a" / WEIGHTS_NAME, blob)
        (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps({**config, "weights_sha256": hashlib.sha256(blob).hexdigest()}))

    as_int = {k: (v * 100).to(torch.int64) if k.endswith("gamma") else v for k, v in tensors.items()}
    rewrite(config, as_int)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"integer tensors .*after_attn.gamma \(torch.int64 in the file, torch.float32"):
        monatune.load_adapter(model, tmp_path / "a")
    assert not monatune.is_tuned(model)
    for change, match in [
        ({"format_version": 2, "monatune_version": "9.0"}, r"format version 2, written by a newer monatune \(9.0\).*upgrade"),
        ({"format_version": "1"}, "no integer \"format_version\""),
        ({"method": None}, "\"method\" must be a string, got None"),
        ({"options": [64]}, r"\"options\" must be a mapping, got \[64\]"),
        ({"layout": "HWC"}, "\"layout\" must be \"NCHW\" or \"NHWC\""),
    ]:
        rewrite({**config, **change}, tensors)
        with pytest.raises(ValueError, match=match):
            monatune.load_adapter(copy.deepcopy(base), tmp_path / "a")
    no_method = {k: v for k, v in config.items() if k != "method"}
    rewrite(no_method, tensors)
    with pytest.raises(ValueError, match="has no \"method\""):
        monatune.load_adapter(copy.deepcopy(base), tmp_path / "a")
