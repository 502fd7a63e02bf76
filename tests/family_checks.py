"""The checks every backbone family passes (imported by name: ``from family_checks import ...``).

Each family's test file builds tiny models from the package's own constructors (no downloads)
and calls these with them:

- :func:`check_identity`: tuned with adapters that are identities, the model computes what it
  computed before (so the tuned forward is the package's forward plus the slots);
- :func:`check_training_step`: after two optimiser steps exactly the method's parameters changed,
  the set written from names and module types (:func:`expected_trainable`), not from the method;
- :func:`check_round_trip`: an adapter saved and loaded into a fresh copy gives the same outputs;
- :func:`check_dense`: a dense backbone gives ``out_channels`` maps at ``strides`` for odd sizes.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import monatune

#: The slots each block method fills (a block has the ones its rule lists).
SLOT_OF = {
    "mona": ("after_attn", "after_mlp", "after_block"),
    "adapter": ("attn_out", "mlp_out"),
    "adaptformer": ("mlp_parallel",),
    "lorand": ("attn_out", "mlp_out"),
    "lora": ("lora",),
    "ssf": ("ssf",),
    "vpt": ("prompt",),
}
NORMS = (nn.LayerNorm, nn.GroupNorm, _BatchNorm)


def make_identity(model: nn.Module) -> None:
    """Turn every adapter into an identity: Mona, adapter, AdaptFormer up-projections and LoRA's B to zero,
    SSF to scale 1 / shift 0 (LoRand and VPT have no identity and are not used here)."""
    with torch.no_grad():
        for _, _, adapter in monatune.adapter_modules(model):
            for name, p in adapter.named_parameters():
                if name.startswith("project2.") or name == "lora_B" or name == "shift":
                    p.zero_()
                elif name == "scale":
                    p.fill_(1.0)


def outputs(out: Any) -> list[torch.Tensor]:
    """Tensors of a model output (a tensor, a dict/list/tuple of them, or an object with them as attributes)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in outputs(v)]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return outputs(out.to_tuple())
    return []


def loss_of(out: Any) -> torch.Tensor:
    return sum((t.float() ** 2).mean() for t in outputs(out) if t.is_floating_point())


def check_identity(model: nn.Module, x: Any, method: str = "mona", atol: float = 1e-5, **apply_kwargs: Any) -> nn.Module:
    """``method`` with identity adapters computes what the plain ``model`` computes; returns the tuned model."""
    model.eval()
    with torch.no_grad():
        expected = outputs(model(*x) if isinstance(x, tuple) else model(x))
    monatune.apply(model, method, **apply_kwargs)
    assert any(True for _ in monatune.adapter_modules(model)), "the method placed nothing"
    make_identity(model)
    with torch.no_grad():
        got = outputs(model(*x) if isinstance(x, tuple) else model(x))
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        torch.testing.assert_close(g, e, atol=atol, rtol=1e-5)
    return model


def expected_trainable(model: nn.Module, method: str, *, head: Sequence[str] = (), last_block: str | None = None) -> set[str]:
    """The trainable set of ``method`` on a tuned ``model``, from names and module types.

    ``head``: names of modules that train too; ``last_block``: the qualified name of the last block
    (for partial-1).
    """
    names = [n for n, _ in model.named_parameters()]
    heads = {n for n in names if any(n.startswith(h + ".") for h in head)}
    own = [n for n in names if n not in heads and ".default." not in n and not n.startswith("monatune_points.")]
    if method == "full":
        return set(names)
    if method == "fixed":
        return heads
    if method == "bitfit":
        return heads | {n for n in own if "bias" in n}
    if method == "norm":
        norms = [m for m, mod in model.named_modules() if isinstance(mod, NORMS) and ".default" not in m]
        return heads | {n for n in own if n.rsplit(".", 1)[0] in norms}
    if method == "partial-1":
        assert last_block is not None
        return heads | {n for n in own if n.startswith(last_block + ".")}
    return heads | {n for n in names if any(f".{slot}.default." in n for slot in SLOT_OF[method])}


def check_training_step(
    make_model: Callable[[], nn.Module],
    method: str,
    x: Any,
    *,
    head: Sequence[str] = (),
    last_block: str | None = None,
    loss: Callable[[Any], torch.Tensor] = loss_of,
    **options: Any,
) -> nn.Module:
    """Two Adam steps change exactly the method's parameters (and no buffer of a frozen BatchNorm)."""
    model = monatune.apply(make_model(), method, head=list(head) or None, **options)
    expected = expected_trainable(model, method, head=head, last_block=last_block)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected, (sorted(trainable ^ expected)[:10])
    assert expected or method == "fixed"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen_bn_buffers = {
        f"{m}.{b}": t.clone()
        for m, mod in model.named_modules()
        if isinstance(mod, _BatchNorm) and not any(p.requires_grad for p in mod.parameters())
        for b, t in mod.named_buffers(recurse=False)
    }
    model.train()
    if expected:
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(2):  # two steps: LoRA's A moves only once B has left zero
            opt.zero_grad()
            loss(model(*x) if isinstance(x, tuple) else model(x)).backward()
            opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected, (sorted(changed ^ expected)[:10])
    buffers = dict(model.named_buffers())
    assert all(torch.equal(buffers[k], v) for k, v in frozen_bn_buffers.items())
    return model


def check_round_trip(base: nn.Module, method: str, x: Any, directory, **apply_kwargs: Any) -> None:
    """Save the adapter of a tuned copy of ``base`` (trained weights perturbed) and load it into another copy."""
    base.eval()
    tuned = monatune.apply(copy.deepcopy(base), method, **apply_kwargs)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    run = (lambda m: m(*x)) if isinstance(x, tuple) else (lambda m: m(x))
    with torch.no_grad():
        expected = outputs(run(tuned))
    monatune.save_adapter(tuned, directory)
    loaded = monatune.load_adapter(copy.deepcopy(base), directory)
    with torch.no_grad():
        got = outputs(run(loaded))
        plain = outputs(run(base))
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert not all(torch.equal(p, e) for p, e in zip(plain, expected))


def check_dense(
    backbone: nn.Module, sizes: Iterable[tuple[int, int]], *, channels: Sequence[int], strides: Sequence[int]
) -> None:
    """``backbone(images)`` gives one NCHW map per ``out_channels`` entry, at ``ceil(size / stride)``."""
    assert list(backbone.out_channels) == list(channels)
    assert list(backbone.strides) == list(strides)
    backbone.eval()
    for h, w in sizes:
        with torch.no_grad():
            maps = backbone(torch.randn(1, 3, h, w))
        assert list(maps) == [str(i) for i in range(len(maps))]
        for i, f in zip(backbone.out_indices if backbone.hierarchical else range(len(maps)), maps.values()):
            s = strides[i]
            assert tuple(f.shape) == (1, channels[i], math.ceil(h / s), math.ceil(w / s)), (h, w, i, tuple(f.shape))
