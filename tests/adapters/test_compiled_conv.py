"""The opaque depthwise convolution Mona uses inside compiled training graphs (monatune.adapters.compiled_conv)."""
import torch
import torch.nn.functional as F

from monatune.adapters.compiled_conv import depthwise_conv2d


def test_it_is_conv2d_with_its_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    w = torch.randn(6, 1, 5, 5, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    y = depthwise_conv2d(x, w, b, 2)
    expected = F.conv2d(x, w, b, padding=2, groups=6)
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), g)
    for got, want in zip(grads, torch.autograd.grad(expected, (x, w, b), g)):
        torch.testing.assert_close(got, want)


def test_its_registrations_pass_torch_opcheck():
    # fake (meta) shapes and strides, autograd registration, schema: what dynamo and AOT autograd rely on
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    torch.library.opcheck(depthwise_conv2d, (x, w, b, 1))
    torch.library.opcheck(torch.ops.monatune.depthwise_conv2d_backward, (torch.randn(2, 4, 6, 5), x.detach(),
                                                                         w.detach(), 1))  # fmt: skip


def test_a_compiled_mona_trains_through_it_with_one_graph_for_every_size():
    """Dynamo + AOT autograd: the operator is in the graph and its fake sizes stay symbolic (inductor's lowering
    of a plain convolution's backward is what it avoids; tests/deploy/test_compile.py runs inductor on a whole
    Mona-tuned model)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from monatune import Mona

    torch._dynamo.reset()
    mona = Mona(8, bottleneck=4, dropout=0.0)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(mona, dynamic=True, backend=counter, fullgraph=True)
    frames = []
    for s in (5, 7, 9):
        x = torch.randn(2, s, s + 1, 8, requires_grad=True)
        compiled(x).sum().backward()
        assert x.grad is not None and mona.adapter_conv.conv1.weight.grad is not None
        frames.append(counter.frame_count)
    assert frames[0] == frames[1] == frames[2]  # nothing recompiled for a new size
    assert any("monatune.depthwise_conv2d" in str(n.target) for g in counter.graphs for n in g.graph.nodes)
