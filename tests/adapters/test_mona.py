"""The Mona module: exact parity with the release's three-convolution form, prefix tokens, layout."""
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from monatune.adapters.mona import Mona


def reference_forward(mona: Mona, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The release's forward, written plainly: three depthwise convs on an NCHW copy, separate projector skip."""
    identity = x
    z = mona.norm(x) * mona.gamma + x * mona.gammax
    p = mona.project1(z)
    b, n, c = p.shape
    m = p.reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2)
    op = mona.adapter_conv
    convs = op.convs()
    m = sum(F.conv2d(m, cv.weight, cv.bias, padding=cv.kernel_size[0] // 2, groups=c) for cv in convs) / len(convs) + m
    m = F.conv2d(m, op.projector.weight, op.projector.bias) + m
    m = m.permute(0, 2, 3, 1).reshape(b, n, c)
    return identity + mona.project2(mona.dropout(F.gelu(m)))


def randomize(mona: Mona) -> Mona:
    with torch.no_grad():
        for p in mona.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == mona.dim else 0.0))
    return mona


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dim,hw,kernel_sizes,bottleneck", [(32, (9, 7), (3, 5, 7), 64), (48, (5, 5), (1, 3), 16), (24, (14, 3), (5,), 8)])
def test_fast_path_matches_three_convolutions_in_outputs_and_every_gradient(dim, hw, kernel_sizes, bottleneck):
    mona = randomize(Mona(dim, bottleneck=bottleneck, kernel_sizes=kernel_sizes, dropout=0.0))
    ref = randomize(Mona(dim, bottleneck=bottleneck, kernel_sizes=kernel_sizes, dropout=0.0))
    ref.load_state_dict(mona.state_dict())
    x = torch.randn(3, hw[0] * hw[1], dim)
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_out = torch.randn(3, hw[0] * hw[1], dim)

    out = mona(x_fast.unflatten(1, hw)).flatten(1, 2)  # the fast path on a channels-last map
    expected = reference_forward(ref, x_ref, hw)
    assert rel_err(out, expected) < 1e-5
    (out * grad_out).sum().backward()
    (expected * grad_out).sum().backward()
    assert rel_err(x_fast.grad, x_ref.grad) < 1e-5
    ref_params = dict(ref.named_parameters())
    for name, p in mona.named_parameters():
        assert p.grad is not None, name
        assert rel_err(p.grad, ref_params[name].grad) < 1e-5, name


def test_token_input_matches_map_input():
    mona = randomize(Mona(16, dropout=0.0))
    x = torch.randn(2, 6, 5, 16)
    assert torch.allclose(mona(x.flatten(1, 2), hw=(6, 5)), mona(x).flatten(1, 2), atol=1e-6)


def test_prefix_tokens_are_isolated_one_by_one_maps():
    mona = randomize(Mona(16, dropout=0.0))
    hw, P = (4, 6), 3
    x = torch.randn(2, P + hw[0] * hw[1], 16)
    out = mona(x, hw=hw, num_prefix_tokens=P)
    # Patch tokens: as if the prefix were not there.
    assert torch.allclose(out[:, P:], mona(x[:, P:], hw=hw), atol=1e-6)
    # Each prefix token: the module on a 1x1 map of its own (zero padding around it).
    for i in range(P):
        single = mona(x[:, i : i + 1].unflatten(1, (1, 1))).flatten(1, 2)
        assert torch.allclose(out[:, i : i + 1], single, atol=1e-6)
    # And a prefix token does not see its neighbours: changing one leaves the others alone.
    x2 = x.clone()
    x2[:, 0] += 5.0
    out2 = mona(x2, hw=hw, num_prefix_tokens=P)
    assert torch.allclose(out2[:, 1:], out[:, 1:], atol=1e-6) and not torch.allclose(out2[:, 0], out[:, 0])


def test_release_initialisation_and_parameter_count():
    for dim in (128, 512):
        mona = Mona(dim)
        assert sum(p.numel() for p in mona.parameters()) == 133 * dim + 9728
        assert torch.all(mona.gamma == 1e-6) and torch.all(mona.gammax == 1.0)
        assert torch.all(mona.norm.weight == 1) and torch.all(mona.norm.bias == 0)
        for lin in (mona.project1, mona.project2):
            assert torch.all(lin.bias == 0)
            assert abs(lin.weight.std().item() - 0.02) < 0.004  # trunc_normal_(std=.02), as timm and the release
        assert mona.project1.out_features == 64 and mona.dropout.p == 0.1
        assert [c.kernel_size for c in mona.adapter_conv.convs()] == [(3, 3), (5, 5), (7, 7)]
    x = torch.randn(1, 3, 3, 128)
    assert not torch.allclose(Mona(128).eval()(x), x)  # not an identity at init (up-projection not zeroed)


def _activation_copies(fn, numel: int) -> list[str]:
    with profile(record_shapes=True) as prof:
        fn()
    found = []
    for e in prof.events():
        if e.name in ("aten::clone", "aten::contiguous") and e.input_shapes and e.input_shapes[0]:
            if torch.Size(e.input_shapes[0]).numel() >= numel:
                found.append(f"{e.name}{e.input_shapes[0]}")
    return found


def test_channels_last_maps_are_not_copied_to_nchw():
    mona = Mona(64).eval()
    x = torch.randn(2, 14, 14, 64)
    with torch.no_grad():
        assert _activation_copies(lambda: mona(x), 2 * 14 * 14 * 64) == []
        # Control: a (B, H, W, C) view of an NCHW tensor has to be copied, and the check sees it.
        nchw_view = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
        assert _activation_copies(lambda: mona(nchw_view), 2 * 14 * 14 * 64)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bottleneck=0), "bottleneck"),
        (dict(kernel_sizes=(3, 4)), "kernel_sizes"),
        (dict(kernel_sizes=()), "kernel_sizes"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mona(32, **kwargs)


def test_bad_token_count_is_explained():
    with pytest.raises(ValueError, match="10 tokens"):
        Mona(8)(torch.randn(1, 10, 8), hw=(3, 3))


# -- the three implementations ------------------------------------------------------------


def _run(mona: Mona, impl: str, x: torch.Tensor, grad_out: torch.Tensor, seed: int = 0, **kwargs):
    """Output, input gradient and parameter gradients of one implementation (fresh grads)."""
    mona.impl = impl
    mona.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = mona(x, **kwargs)
    (out * grad_out).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in mona.named_parameters()}


def _assert_same(a, b, tol=1e-5):
    out_a, dx_a, grads_a = a
    out_b, dx_b, grads_b = b
    assert rel_err(out_a, out_b) < tol
    assert rel_err(dx_a, dx_b) < tol
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert rel_err(grads_a[name], grads_b[name]) < tol, name


@pytest.mark.parametrize("layout", ["map", "tokens", "prefix"])
def test_fused_plain_and_release_agree_in_training_mode_with_dropout(layout):
    """Same seed, same dropout mask: all three implementations give the same outputs and gradients."""
    mona = randomize(Mona(24, bottleneck=16, dropout=0.3)).train()
    hw, P = (5, 7), (2 if layout == "prefix" else 0)
    if layout == "map":
        x, kwargs = torch.randn(3, *hw, 24), {}
    else:
        x, kwargs = torch.randn(3, P + hw[0] * hw[1], 24), dict(hw=hw, num_prefix_tokens=P)
    grad_out = torch.randn_like(x)
    fused = _run(mona, "fused", x, grad_out, **kwargs)
    _assert_same(fused, _run(mona, "plain", x, grad_out, **kwargs))
    _assert_same(fused, _run(mona, "release", x, grad_out, **kwargs))
    # The dropout is live: a different seed gives a different output.
    assert rel_err(_run(mona, "fused", x, grad_out, seed=1, **kwargs)[0], fused[0]) > 1e-3


def test_dropout_keeps_each_unit_with_probability_one_minus_p():
    from monatune.adapters.mona import _keep_mask

    torch.manual_seed(0)
    keep = _keep_mask((256, 256), 0.25, torch.device("cpu"))
    assert keep.dtype == torch.bool and abs(keep.float().mean().item() - 0.75) < 0.01
    # Kept units are rescaled by 1 / (1 - p): averaged over many positions, training matches eval.
    mona = randomize(Mona(8, bottleneck=64, dropout=0.25))
    x = torch.randn(1, 1, 8).expand(1, 4096, 8).unflatten(1, (64, 64)).contiguous()
    train_mean = (mona.train()(x) - x).mean((0, 1, 2))
    eval_mean = (mona.eval()(x) - x).mean((0, 1, 2))
    assert rel_err(train_mean, eval_mean) < 0.05


def test_fused_backward_passes_gradcheck_in_double_precision():
    mona = randomize(Mona(6, bottleneck=4, kernel_sizes=(1, 3), dropout=0.0)).double()
    x = torch.randn(2, 1 + 3 * 4, 6, dtype=torch.float64, requires_grad=True)
    params = [p for p in mona.parameters()]

    def f(x, *ps):
        return mona(x, hw=(3, 4), num_prefix_tokens=1)

    assert mona.impl == "fused" and mona._can_fuse(x)
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


def test_input_without_gradient_still_trains_the_module():
    """The first Mona after a frozen stem gets an input that needs no gradient."""
    mona = randomize(Mona(16, dropout=0.0))
    x = torch.randn(2, 4, 4, 16)
    out = mona(x)
    out.square().sum().backward()
    fused = {n: p.grad.clone() for n, p in mona.named_parameters()}
    mona.zero_grad(set_to_none=True)
    mona.impl = "plain"
    mona(x).square().sum().backward()
    for n, p in mona.named_parameters():
        assert rel_err(fused[n], p.grad) < 1e-5, n


def test_autocast_uses_the_plain_path_and_low_precision_matmuls():
    mona = randomize(Mona(16, dropout=0.0))
    x = torch.randn(2, 4, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not mona._can_fuse(x)
        out = mona(x)
    assert rel_err(out.float(), mona(x)) < 2e-2


def test_compiles_without_graph_breaks():
    mona = randomize(Mona(16, bottleneck=8, dropout=0.0))
    x = torch.randn(2, 5, 5, 16, requires_grad=True)
    compiled = torch.compile(mona, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    out = compiled(x)
    out.sum().backward()
    assert rel_err(out, mona(x)) < 1e-5


def test_unknown_implementation_is_named():
    from monatune.adapters.mona import set_mona_impl

    with pytest.raises(ValueError, match="fast.*choose from"):
        set_mona_impl(Mona(8), "fast")
    mona = Mona(8)
    mona.impl = "fast"
    with pytest.raises(ValueError, match="unknown Mona implementation"):
        mona(torch.randn(1, 2, 2, 8))


def test_fused_backward_keeps_its_output_not_its_input():
    """For backward the fused path keeps the output (which the next LayerNorm keeps anyway) and
    bottleneck-wide maps: no second stream-wide tensor, and less than the plain path keeps."""
    mona = randomize(Mona(96, bottleneck=16)).train()
    x = torch.randn(2, 8, 8, 96, requires_grad=True)
    weights = {p.untyped_storage().data_ptr() for p in mona.parameters()}

    def kept(impl):
        mona.impl = impl
        tensors = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: tensors.append(t) or t, lambda t: t):
            out = mona(x)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return out, {k: v for k, v in storages.items() if k not in weights}

    out, fused = kept("fused")
    wide = {k for k, v in fused.items() if v >= out.numel() * out.element_size()}
    assert wide == {out.untyped_storage().data_ptr()}
    rows = x.numel() // 96
    per_row = 16 * 4 + 16 + 2 * 4  # the 16-channel map, the dropout mask, two statistics
    folded = 2 * 96 * 4 + 16 * 49 * 4 + 16 * 16 * 4 + 16 * 4  # scaled affine, assembled kernel and projector
    assert sum(fused.values()) - out.numel() * 4 <= rows * per_row + folded
    _, plain = kept("plain")
    assert sum(fused.values()) < sum(plain.values())
    # The input is recovered from the output, so gradients still match the plain path's.
    mona.impl = "fused"
    torch.manual_seed(3)
    mona(x).square().sum().backward()
    fused_grads = [x.grad.clone()] + [p.grad.clone() for p in mona.parameters()]
    x.grad = None
    mona.zero_grad(set_to_none=True)
    mona.impl = "plain"
    torch.manual_seed(3)
    mona(x).square().sum().backward()
    for a, b in zip(fused_grads, [x.grad] + [p.grad for p in mona.parameters()]):
        assert rel_err(a, b) < 1e-5


def test_changing_the_fused_output_in_place_is_refused():
    """Backward needs the output as it was: autograd refuses in-place changes instead of giving wrong gradients."""
    mona = randomize(Mona(16, dropout=0.0))
    out = mona(torch.randn(2, 4, 4, 16, requires_grad=True))
    with pytest.raises(RuntimeError, match="inplace"):
        out.mul_(2)
        out.sum().backward()


def test_fused_inference_skips_autograd_and_gives_the_same_output():
    mona = randomize(Mona(32, bottleneck=8)).eval()
    x = torch.randn(2, 6, 6, 32)
    with_grad = mona(x)
    assert with_grad.grad_fn is not None and "MonaFunction" in type(with_grad.grad_fn).__name__
    with torch.inference_mode():
        fast = mona(x)
    assert fast.grad_fn is None and torch.equal(fast, with_grad.detach())
    mona.impl = "plain"
    with torch.no_grad():
        assert rel_err(fast, mona(x)) < 1e-6
