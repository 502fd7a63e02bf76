"""Memory options for frozen backbones: same results (checkpointing) or close ones (frozen precision), less stored."""
import copy

import pytest
import torch
from tiny_models import tiny_swin, tiny_vit

import monatune
from monatune.models.dense import build_dense_backbone
from monatune.memory import frozen_precision, set_activation_checkpointing, set_frozen_precision


def tuned(model, method="mona", drop_path=False):
    monatune.apply(model, method)
    return model.train()


def step(model, x, seed=1):
    """Output and every trainable gradient of one forward/backward, with the RNG seeded (dropout, drop-path)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    out = out if isinstance(out, torch.Tensor) else torch.cat([o.flatten() for o in out.values()])
    out.float().square().sum().backward()
    return out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def saved_bytes(model, x) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward (frozen weights excluded)."""
    weights = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in weights:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return total


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()  # 0 when both are zero (LoRA's A at init)


@pytest.mark.parametrize("make", [lambda: tiny_swin(drop_path_rate=0.3), lambda: tiny_vit(drop_path_rate=0.3)], ids=["swin", "vit"])
def test_checkpointing_gives_identical_outputs_and_gradients(make):
    torch.manual_seed(0)
    plain = tuned(make())
    ckpt = copy.deepcopy(plain)
    assert set_activation_checkpointing(ckpt) == 1
    x = torch.randn(2, 3, 224, 224) if isinstance(plain, type(tiny_vit())) else torch.randn(2, 3, 224, 224)
    out_a, grads_a = step(plain, x)
    out_b, grads_b = step(ckpt, x)
    assert torch.equal(out_a, out_b)  # dropout and drop-path draw the same masks in the recomputation
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7), name
    # And it is really on: far less is kept for backward.
    assert saved_bytes(ckpt, x) < 0.25 * saved_bytes(plain, x)


def test_checkpointing_reaches_the_backbone_inside_a_dense_model():
    torch.manual_seed(0)
    dense = build_dense_backbone(
        "swin_tiny_patch4_window7_224", "mona", model_kwargs=dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
    ).train()
    wrapper = torch.nn.ModuleDict({"backbone": dense})
    ckpt = copy.deepcopy(dense)
    assert set_activation_checkpointing(torch.nn.ModuleDict({"backbone": ckpt})) == 1
    x = torch.randn(1, 3, 96, 128)
    out_a, grads_a = step(dense, x)
    out_b, grads_b = step(ckpt, x)
    assert torch.allclose(out_a, out_b) and all(torch.allclose(grads_a[n], grads_b[n], atol=1e-7) for n in grads_a)
    del wrapper


def test_checkpointing_needs_a_timm_backbone():
    with pytest.raises(ValueError, match="no timm backbone"):
        set_activation_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("method", ["mona", "lora", "adapter"])
def test_frozen_precision_keeps_trainables_in_float32_and_stays_close(method):
    torch.manual_seed(0)
    plain = tuned(tiny_swin(), method)
    low = copy.deepcopy(plain)
    set_frozen_precision(low, "bf16")
    assert frozen_precision(low) == torch.bfloat16
    x = torch.randn(2, 3, 224, 224)
    out_a, grads_a = step(plain, x)
    out_b, grads_b = step(low, x)
    assert out_b.dtype == torch.float32
    assert rel(out_b, out_a) < 2e-2
    for name, p in low.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
            assert rel(grads_b[name], grads_a[name]) < 5e-2, name
    frozen = [p for m in low.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False) if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert saved_bytes(low, x) < 0.9 * saved_bytes(plain, x)  # mostly the frozen blocks; adapters stay float32


def test_frozen_precision_turns_off_and_checks_its_input():
    model = tuned(tiny_swin())
    set_frozen_precision(model, torch.float16)
    set_frozen_precision(model, None)
    assert frozen_precision(model) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model._forward_pre_hooks
    with pytest.raises(ValueError, match="choose from"):
        set_frozen_precision(model, "int8")
    with pytest.raises(ValueError, match="no frozen parameters"):
        set_frozen_precision(tiny_swin(), "bf16")  # full fine-tuning: everything trains


def test_both_options_together_train_a_step():
    torch.manual_seed(0)
    model = tuned(tiny_swin())
    set_activation_checkpointing(model)
    set_frozen_precision(model, "bf16")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(4, 3, 224, 224), torch.tensor([0, 1, 2, 3])
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_task_modules_take_the_options():
    from monatune.tasks import ImageClassifier

    kwargs = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
    task = ImageClassifier("swin_tiny_patch4_window7_224", num_classes=3, model_kwargs=kwargs,
                           activation_checkpointing=True, frozen_precision="bf16")
    task.configure_model()
    assert frozen_precision(task.tuned) == torch.bfloat16
    assert all(stage.grad_checkpointing for stage in task.tuned.layers)
    with pytest.raises(ValueError, match="method 'full'"):
        ImageClassifier("swin_tiny_patch4_window7_224", num_classes=3, method="full", frozen_precision="bf16")
    with pytest.raises(ValueError, match="choose from"):
        ImageClassifier("swin_tiny_patch4_window7_224", num_classes=3, frozen_precision="int4")
