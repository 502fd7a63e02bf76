"""The comparison methods' modules against independent reference computations.

Covers the Houlsby/AdaptFormer ``Bottleneck``, ``LoRand`` (outputs, the shared kernel's
gradient, parameter counts incl. the paper's Swin-B figure), ``LoRA`` on slices of a fused
qkv (forward, ``delta_weight``, ``merge_into``, release layout), ``SSF`` (init statistics,
forward, folding into Linear / bias-free Linear / LayerNorm / Conv2d hosts), the Swin VPT
``prompted_window_attention`` (against an explicit per-window loop, with and without a
shift mask) and the VPT ``Prompt`` / ``PromptCarry`` hand-over. Every reference is written
here with plain matrix products and loops, not with the modules' own helpers.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monatune.adapters.bottleneck import Bottleneck
from monatune.adapters.lora import LoRA
from monatune.adapters.lorand import LoRand
from monatune.adapters.ssf import SSF
from monatune.adapters.vpt import Prompt, PromptCarry
from monatune.models.swin import prompted_window_attention

D = torch.float64


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, written out."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def randomize_(module: nn.Module, std: float = 0.5) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * std)
    return module


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- Bottleneck


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_bottleneck_matches_reference_in_eval(residual, scale):
    dim, hidden = 6, 5
    mod = randomize_(Bottleneck(dim, bottleneck=hidden, dropout=0.3, scale=scale, residual=residual)).to(D).eval()
    x = torch.randn(2, 3, dim, dtype=D)
    w1, b1 = mod.project1.weight, mod.project1.bias
    w2, b2 = mod.project2.weight, mod.project2.bias
    branch = torch.einsum("dh,bnh->bnd", w2, gelu(torch.einsum("hd,bnd->bnh", w1, x) + b1)) + b2
    expected = x + scale * branch if residual else scale * branch
    torch.testing.assert_close(mod(x), expected, rtol=1e-12, atol=1e-12)


def test_bottleneck_dropout_is_active_in_training_only():
    mod = randomize_(Bottleneck(8, bottleneck=16, dropout=0.5)).to(D)
    x = torch.randn(4, 8, dtype=D)
    eval_out = mod.eval()(x)
    assert not torch.allclose(mod.train()(x), eval_out)


def test_bottleneck_parameter_names_and_count():
    for dim in (1, 96, 1024):
        mod = Bottleneck(dim)
        assert {name for name, _ in mod.named_parameters()} == {
            "project1.weight", "project1.bias", "project2.weight", "project2.bias"
        }
        assert mod.project1.weight.shape == (64, dim) and mod.project2.weight.shape == (dim, 64)
        assert n_params(mod) == 129 * dim + 64


@pytest.mark.parametrize(
    "kwargs,name", [({"bottleneck": 0}, "bottleneck"), ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout")]
)
def test_bottleneck_rejects_bad_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Bottleneck(16, **kwargs)


# --------------------------------------------------------------------------- LoRand


def lorand_reference(x, down_p, down_q, kernel, up_p, up_q, down_bias, up_bias):
    """x + W_up gelu(W_down x + b_down) + b_up, with W assembled branch by branch."""
    w_down = sum((down_p[i] @ kernel[i] @ down_q[i]).T for i in range(kernel.shape[0]))  # m x C
    w_up = sum((up_p[i] @ kernel[i] @ up_q[i]).T for i in range(kernel.shape[0]))  # C x m
    hidden = gelu(x @ w_down.T + down_bias)
    return x + hidden @ w_up.T + up_bias


def lorand_params(mod: LoRand):
    return mod.down_p, mod.down_q, mod.kernel, mod.up_p, mod.up_q, mod.down_bias, mod.up_bias


def test_lorand_shapes_and_default_bottleneck():
    mod = LoRand(12, rank=3, branches=4)
    assert mod.bottleneck == 6
    shapes = {name: tuple(p.shape) for name, p in mod.named_parameters()}
    assert shapes == {
        "down_p": (4, 12, 3), "down_q": (4, 3, 6), "kernel": (4, 3, 3),
        "up_p": (4, 6, 3), "up_q": (4, 3, 12), "down_bias": (6,), "up_bias": (12,),
    }


@pytest.mark.parametrize("dim,bottleneck,rank,branches", [(10, None, 3, 2), (8, 5, 2, 3), (6, 4, 4, 1)])
def test_lorand_matches_reference(dim, bottleneck, rank, branches):
    mod = LoRand(dim, bottleneck=bottleneck, rank=rank, branches=branches).to(D)
    x = torch.randn(2, 3, dim, dtype=D)
    torch.testing.assert_close(mod(x), lorand_reference(x, *lorand_params(mod)), rtol=1e-12, atol=1e-12)
    m = dim // 2 if bottleneck is None else bottleneck
    assert n_params(mod) == branches * (2 * rank * (dim + m) + rank * rank) + m + dim


def test_lorand_kernel_is_shared_by_both_projections():
    mod = LoRand(8, rank=3, branches=2).to(D)
    x = torch.randn(4, 8, dtype=D)
    g = torch.randn(4, 8, dtype=D)
    (mod(x) * g).sum().backward()

    p = [t.detach().clone() for t in lorand_params(mod)]
    kernel = p[2].clone().requires_grad_(True)

    def loss(k_down, k_up):
        w_down = sum((p[0][i] @ k_down[i] @ p[1][i]).T for i in range(2))
        w_up = sum((p[3][i] @ k_up[i] @ p[4][i]).T for i in range(2))
        return ((x + gelu(x @ w_down.T + p[5]) @ w_up.T + p[6]) * g).sum()

    (full,) = torch.autograd.grad(loss(kernel, kernel), kernel)
    (down_only,) = torch.autograd.grad(loss(kernel, p[2]), kernel)
    (up_only,) = torch.autograd.grad(loss(p[2], kernel), kernel)
    torch.testing.assert_close(mod.kernel.grad, full, rtol=1e-10, atol=1e-12)
    # Both paths contribute: the gradient is neither path's alone.
    assert not torch.allclose(mod.kernel.grad, down_only, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(mod.kernel.grad, up_only, rtol=1e-6, atol=1e-9)


def test_lorand_swin_b_total_is_1_197_312():
    dims = [128] * 2 + [256] * 2 + [512] * 18 + [1024] * 2
    with torch.device("meta"):
        total = sum(n_params(LoRand(c)) for c in dims for _ in range(2))
    assert total == 1_197_312


# --------------------------------------------------------------------------- LoRA


def test_lora_is_identity_at_init():
    lora = LoRA(8, 24, rank=4, num_slices=3, slices=(0, 2))
    assert lora.merged is False
    assert torch.count_nonzero(lora.lora_B) == 0 and torch.count_nonzero(lora.lora_A) > 0
    x, y = torch.randn(3, 8), torch.randn(3, 24)
    assert torch.equal(lora(x, y), y)


def _qv_lora(C: int, r: int, alpha: float):
    host = nn.Linear(C, 3 * C).to(D)
    lora = LoRA(C, 3 * C, rank=r, alpha=alpha, num_slices=3, slices=(0, 2)).to(D)
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn_like(lora.lora_B))
    return host, lora


def _qv_reference_weight(host: nn.Linear, lora: LoRA, C: int, r: int, alpha: float) -> torch.Tensor:
    A_q, A_v = lora.lora_A[:r], lora.lora_A[r:]
    B_q, B_v = lora.lora_B[:C], lora.lora_B[C:]
    w = host.weight.detach().clone()
    w[:C] += (alpha / r) * B_q @ A_q
    w[2 * C:] += (alpha / r) * B_v @ A_v
    return w


@pytest.mark.parametrize("lead", [(5,), (2, 4), (2, 3, 2)])
def test_lora_on_query_and_value_slices_matches_reference(lead):
    C, r, alpha = 6, 4, 3.0
    host, lora = _qv_lora(C, r, alpha)
    assert lora.scaling == pytest.approx(alpha / r)
    assert lora.lora_A.shape == (2 * r, C) and lora.lora_B.shape == (2 * C, r)
    w_ref = _qv_reference_weight(host, lora, C, r, alpha)
    x = torch.randn(*lead, C, dtype=D)
    out = lora(x, host(x))
    expected = F.linear(x, w_ref, host.bias)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # the key rows are untouched, the query and value rows are not
    torch.testing.assert_close(out[..., C:2 * C], host(x)[..., C:2 * C], rtol=0, atol=0)
    assert not torch.allclose(out[..., :C], host(x)[..., :C])
    assert not torch.allclose(out[..., 2 * C:], host(x)[..., 2 * C:])


def test_lora_delta_weight_and_merge_into():
    C, r, alpha = 6, 4, 3.0
    host, lora = _qv_lora(C, r, alpha)
    w_ref = _qv_reference_weight(host, lora, C, r, alpha)
    delta = lora.delta_weight()
    assert delta.shape == (2, C, C)
    torch.testing.assert_close(delta[0], w_ref[:C] - host.weight[:C], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta[1], w_ref[2 * C:] - host.weight[2 * C:], rtol=1e-12, atol=1e-12)

    x = torch.randn(2, 3, C, dtype=D)
    unmerged = lora(x, host(x))
    weight_before = host.weight
    lora.merge_into(host)
    assert host.weight is weight_before  # in place
    torch.testing.assert_close(host.weight, w_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(host(x), F.linear(x, w_ref, host.bias), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(host(x), unmerged, rtol=1e-12, atol=1e-12)


def test_lora_on_every_slice_of_a_plain_linear():
    C_in, C_out, r, alpha = 5, 7, 3, 2.0
    host = nn.Linear(C_in, C_out).to(D)
    lora = LoRA(C_in, C_out, rank=r, alpha=alpha).to(D)
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn_like(lora.lora_B))
    x = torch.randn(4, C_in, dtype=D)
    expected = F.linear(x, host.weight + (alpha / r) * lora.lora_B @ lora.lora_A, host.bias)
    torch.testing.assert_close(lora(x, host(x)), expected, rtol=1e-12, atol=1e-12)
    lora.merge_into(host)
    torch.testing.assert_close(host(x), expected, rtol=1e-12, atol=1e-12)


def test_lora_release_layout():
    C = 128
    lora = LoRA(C, 3 * C, rank=64, num_slices=3, slices=(0, 2))
    assert lora.lora_A.shape == (128, 128)
    assert lora.lora_B.shape == (256, 64)
    assert n_params(lora) == 4 * 64 * C


@pytest.mark.parametrize("kwargs", [{"rank": 0}, {"slices": (3,)}, {"slices": (-1,)}, {"slices": ()}])
def test_lora_rejects_bad_options(kwargs):
    kwargs = {"rank": 4, "num_slices": 3, "slices": (0, 2), **kwargs}
    with pytest.raises(ValueError):
        LoRA(8, 24, **kwargs)


# --------------------------------------------------------------------------- SSF


def test_ssf_init_statistics():
    ssf = SSF(4096)
    assert abs(ssf.scale.mean().item() - 1.0) < 0.01
    assert 0.015 < ssf.scale.std().item() < 0.025
    assert abs(ssf.shift.mean().item()) < 0.01
    assert 0.015 < ssf.shift.std().item() < 0.025
    assert ssf.merged is False


@pytest.mark.parametrize("channel_dim,shape", [(-1, (2, 3, 5)), (1, (2, 5, 3, 4))])
def test_ssf_forward_is_per_channel_affine(channel_dim, shape):
    ssf = SSF(5, channel_dim=channel_dim).to(D)
    x = torch.randn(*shape, dtype=D)
    y = torch.randn(*shape, dtype=D)
    out = ssf(x, y)
    cd = channel_dim % len(shape)
    for c in range(5):
        idx = [slice(None)] * len(shape)
        idx[cd] = c
        torch.testing.assert_close(out[tuple(idx)], y[tuple(idx)] * ssf.scale[c] + ssf.shift[c], rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "make_host,channel_dim,x_shape",
    [
        (lambda: nn.Linear(6, 5), -1, (2, 3, 6)),
        (lambda: nn.Linear(6, 5, bias=False), -1, (2, 3, 6)),
        (lambda: nn.LayerNorm(5), -1, (2, 3, 5)),
        (lambda: nn.Conv2d(3, 5, kernel_size=3, padding=1), 1, (2, 3, 4, 4)),
    ],
    ids=["linear", "linear-no-bias", "layernorm", "conv2d"],
)
def test_ssf_merge_into_host(make_host, channel_dim, x_shape):
    host = randomize_(make_host()).to(D)
    ssf = SSF(5, channel_dim=channel_dim).to(D)
    with torch.no_grad():  # away from the identity, so a wrong fold shows
        ssf.scale.copy_(1.0 + 0.5 * torch.randn(5))
        ssf.shift.copy_(0.5 * torch.randn(5))
    original = copy.deepcopy(host)
    had_bias = host.bias is not None
    x = torch.randn(*x_shape, dtype=D)
    expected = ssf(x, original(x))
    ssf.merge_into(host)
    if not had_bias:
        assert isinstance(host.bias, nn.Parameter) and host.bias.shape == (5,)
    torch.testing.assert_close(host(x), expected, rtol=0, atol=1e-10)
    assert not torch.allclose(host(x), original(x))


# --------------------------------------------------------------------------- Swin VPT attention


def prompted_attention_reference(attn, windows, mask, prompts):
    """One window at a time: tokens [prompts_b ; window], explicit scores, softmax, heads merged."""
    B, n, C = prompts.shape
    nWB, N, _ = windows.shape
    nW = nWB // B
    H = attn.num_heads
    hd = attn.qkv.out_features // 3 // H
    rel = attn._get_rel_pos_bias()[0]  # heads, N, N
    w_qkv, b_qkv = attn.qkv.weight, attn.qkv.bias
    win_out, prompt_sum = [], torch.zeros(B, n, C, dtype=windows.dtype)
    for j in range(nWB):
        b, w = divmod(j, nW)  # windows are batch-major
        tokens = torch.cat([prompts[b], windows[j]], dim=0)  # T, C
        T = n + N
        qkv = tokens @ w_qkv.T + b_qkv  # T, 3*H*hd
        heads = []
        for h in range(H):
            q = qkv[:, h * hd:(h + 1) * hd]
            k = qkv[:, H * hd + h * hd:H * hd + (h + 1) * hd]
            v = qkv[:, 2 * H * hd + h * hd:2 * H * hd + (h + 1) * hd]
            bias = torch.zeros(T, T, dtype=windows.dtype)
            bias[n:, n:] = rel[h]
            if mask is not None:
                bias[n:, n:] += mask[w]
            scores = q @ k.T * hd ** -0.5 + bias
            heads.append(torch.softmax(scores, dim=-1) @ v)
        out = torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias  # T, C
        win_out.append(out[n:])
        prompt_sum[b] += out[:n]
    return torch.stack(win_out), prompt_sum / nW


def _window_attention(C=8, heads=2, window=(3, 3)):
    from timm.models.swin_transformer import WindowAttention

    attn = WindowAttention(C, num_heads=heads, window_size=window)
    with torch.no_grad():  # a rel-pos bias large enough to matter
        attn.relative_position_bias_table.copy_(torch.randn_like(attn.relative_position_bias_table))
    return attn.double().eval()


def _shift_like_mask(nW: int, N: int) -> torch.Tensor:
    groups = torch.randint(0, 3, (nW, N))
    groups[0] = 0  # one unmasked window
    mask = torch.zeros(nW, N, N, dtype=D)
    return mask.masked_fill(groups.unsqueeze(1) != groups.unsqueeze(2), -100.0)


def test_reference_without_prompts_is_timms_window_attention():
    """Sanity check of the reference itself: with no prompts it is timm's attention."""
    attn = _window_attention()
    B, nW, N, C = 2, 4, 9, 8
    windows = torch.randn(nW * B, N, C, dtype=D)
    mask = _shift_like_mask(nW, N)
    empty = torch.zeros(B, 0, C, dtype=D)
    for m in (None, mask):
        ref, _ = prompted_attention_reference(attn, windows, m, empty)
        torch.testing.assert_close(ref, attn(windows, mask=m), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "shift-mask"])
def test_prompted_window_attention_matches_reference(masked):
    attn = _window_attention()
    B, nW, N, C, n = 2, 4, 9, 8, 3
    windows = torch.randn(nW * B, N, C, dtype=D)
    prompts = torch.randn(B, n, C, dtype=D)
    mask = _shift_like_mask(nW, N) if masked else None
    win_out, prompt_out = prompted_window_attention(attn, windows, mask, prompts)
    ref_win, ref_prompt = prompted_attention_reference(attn, windows, mask, prompts)
    assert win_out.shape == (nW * B, N, C) and prompt_out.shape == (B, n, C)
    torch.testing.assert_close(win_out, ref_win, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(prompt_out, ref_prompt, rtol=1e-10, atol=1e-12)
    # the prompts really take part: the windows' outputs differ from prompt-free attention
    assert not torch.allclose(win_out, attn(windows, mask=mask), atol=1e-6)


# --------------------------------------------------------------------------- VPT Prompt


def test_learned_prompt_init_range_and_enter():
    dim, n, patch_area = 64, 50, 16
    prompt = Prompt(dim, num_tokens=n, patch_area=patch_area)
    bound = math.sqrt(6.0 / (3 * patch_area + dim))
    assert isinstance(prompt.tokens, nn.Parameter) and prompt.tokens.shape == (n, dim)
    assert prompt.tokens.abs().max().item() <= bound
    assert prompt.tokens.abs().max().item() > 0.9 * bound  # spans the range, not a narrower one
    like = torch.zeros(1, dtype=D)
    out = prompt.enter(3, like)
    assert out.shape == (3, n, dim) and out.dtype == D
    for b in range(3):
        torch.testing.assert_close(out[b], prompt.tokens.detach().to(D), rtol=0, atol=0)
    # gradients reach the parameters
    out.sum().backward()
    torch.testing.assert_close(prompt.tokens.grad, torch.full((n, dim), 3.0))


def test_prompt_carry_hand_over():
    dim, n = 8, 4
    carry = PromptCarry()
    first = Prompt(dim, n, learned=True, carry=carry)
    middle = Prompt(dim, n, learned=False, carry=carry)
    last = Prompt(dim, n, learned=False, carry=carry, last=True)
    assert middle.tokens is None and n_params(middle) == 0

    t1 = first.enter(2, torch.zeros(1)) + 1.0
    first.leave(t1)
    assert carry.tokens is t1
    got = middle.enter(2, torch.zeros(1))
    assert torch.equal(got, t1)
    t2 = got * 2.0
    middle.leave(t2)
    assert carry.tokens is t2
    assert torch.equal(last.enter(2, torch.zeros(1)), t2)
    last.leave(t2 + 1.0)
    assert carry.tokens is None
    assert first.carries and middle.carries and not last.carries


def test_carried_prompt_goes_through_patch_merging_at_a_stage_boundary():
    from types import SimpleNamespace

    carry = PromptCarry()
    prompt = Prompt(8, 3, learned=False, carry=carry)
    norm, reduction = nn.LayerNorm(32).to(D), randomize_(nn.Linear(32, 16, bias=False)).to(D)
    randomize_(norm)
    prompt.__dict__["merge_layer"] = SimpleNamespace(norm=norm, reduction=reduction)
    carry.tokens = torch.randn(2, 3, 8, dtype=D)
    out = prompt.enter(2, carry.tokens)
    t = carry.tokens.repeat(1, 1, 4)
    mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
    expected = ((t - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias) @ reduction.weight.T
    assert out.shape == (2, 3, 16)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_deep_prompt_leave_stores_nothing():
    prompt = Prompt(8, 2)
    assert not prompt.carries
    prompt.leave(torch.ones(1, 2, 8))  # no carry: nothing to do, no error
    assert prompt.carry is None


def test_carried_prompt_without_tokens_raises():
    with pytest.raises(RuntimeError):
        Prompt(8, 2, learned=False, carry=PromptCarry()).enter(1, torch.zeros(1))
    with pytest.raises(RuntimeError):
        Prompt(8, 2, learned=False, carry=None).enter(1, torch.zeros(1))


def test_prompt_rejects_zero_tokens():
    with pytest.raises(ValueError, match="num_tokens"):
        Prompt(8, num_tokens=0)
