"""Method options: each one's type and value are checked before the model is touched (issue 17, item 10)."""
import dataclasses
import math

import pytest
import torch
from tiny_models import tiny_vit

import monatune
from monatune.methods import METHODS, Check, resolve_method

BAD = [  # method, option, value, what the error says is allowed
    ("mona", "kernel_sizes", 3, "a non-empty list of positive odd ints"),
    ("mona", "kernel_sizes", "(3,5)", "a non-empty list of positive odd ints"),
    ("mona", "kernel_sizes", [], "a non-empty list of positive odd ints"),
    ("mona", "kernel_sizes", [3, 4], "a non-empty list of positive odd ints"),
    ("mona", "kernel_sizes", [3, True], "a non-empty list of positive odd ints"),
    ("mona", "kernel_sizes", [3, 5.0], "a non-empty list of positive odd ints"),
    ("mona", "bottleneck", 0, "a positive int"),
    ("mona", "bottleneck", "64", "a positive int"),
    ("mona", "bottleneck", 32.5, "a positive int"),
    ("mona", "bottleneck", True, "a positive int"),
    ("mona", "dropout", 1.0, "a number in [0, 1)"),
    ("mona", "dropout", "0.1", "a number in [0, 1)"),
    ("mona", "dropout", math.nan, "a number in [0, 1)"),
    ("adapter", "bottleneck", -1, "a positive int"),
    ("adapter", "dropout", -0.1, "a number in [0, 1)"),
    ("adaptformer", "scale", "big", "a finite number"),
    ("adaptformer", "scale", math.inf, "a finite number"),
    ("lora", "rank", 0, "a positive int"),
    ("lora", "alpha", None, "a finite number"),
    ("lora", "modules", 3, "a non-empty subset of ('q', 'k', 'v', 'proj', 'fc1', 'fc2')"),
    ("lora", "modules", [], "a non-empty subset of"),
    ("lora", "modules", ["q", "query"], "a non-empty subset of"),
    ("lorand", "bottleneck", 0, "a positive int, or null"),
    ("lorand", "bottleneck", False, "a positive int, or null"),
    ("lorand", "branches", [2], "a positive int"),
    ("vpt", "num_tokens", 0, "a positive int"),
    ("vpt", "deep", "yes", "true or false"),
    ("partial-1", "blocks", 1.0, "a positive int"),
]


@pytest.mark.parametrize("method, name, value, allowed", BAD, ids=[f"{m}-{n}-{v!r}" for m, n, v, _ in BAD])
def test_a_bad_value_is_a_value_error_naming_method_option_value_and_what_is_allowed(method, name, value, allowed):
    with pytest.raises(ValueError) as info:
        resolve_method(method, {name: value})
    message = str(info.value)
    assert message.startswith(f"{method} option `{name}` must be {allowed}"), message
    assert message.endswith(f", got {value!r}") and "\n" not in message


@pytest.mark.parametrize("method, name, value", [
    ("mona", "kernel_sizes", 3), ("mona", "kernel_sizes", "(3,5)"), ("mona", "dropout", 1.0), ("adapter", "bottleneck", -1),
    ("lora", "modules", 3), ("lora", "alpha", None), ("vpt", "deep", "yes"), ("partial-1", "blocks", 1.0),
])  # fmt: skip
def test_apply_refuses_before_touching_the_model(method, name, value):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match=f"{method} option `{name}`"):
        monatune.apply(model, method, **{name: value})
    assert not monatune.is_tuned(model)
    assert [n for n, _ in model.named_modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_good_values_are_kept_in_a_standard_form():
    assert resolve_method("mona", {"kernel_sizes": [3, 5], "dropout": 0}).to_dict() == {
        "bottleneck": 64, "kernel_sizes": (3, 5), "dropout": 0.0, "init": "trunc_normal"}  # fmt: skip
    assert resolve_method("lora", {"modules": ["q", "k"], "alpha": 2}).modules == ("q", "k")
    assert resolve_method("lora", {"modules": "v"}).modules == ("v",)
    assert resolve_method("lorand", {"bottleneck": None}).bottleneck is None
    model = monatune.apply(tiny_vit(), "mona", kernel_sizes=(3,), bottleneck=8)
    mona = model.blocks[0].after_attn["default"]
    assert (mona.project1.out_features, mona.adapter_conv.kernel_sizes) == (8, (3,))


def test_the_options_argument_and_option_names_are_checked():
    with pytest.raises(ValueError, match=r"options of method 'mona' must be a mapping .*got \[\('bottleneck', 8\)\]"):
        resolve_method("mona", [("bottleneck", 8)])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \[1\] for method 'mona'"):
        resolve_method("mona", {1: 8})
    with pytest.raises(ValueError, match=r"unknown tuning method \['mona'\]"):
        resolve_method(["mona"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_option_says_what_it_accepts_and_its_default_passes(method):
    for f in dataclasses.fields(METHODS[method]):
        assert isinstance(f.metadata.get("check"), Check), f"{method}.{f.name} is not declared with option()"
    resolve_method(method)  # the defaults pass their own checks
