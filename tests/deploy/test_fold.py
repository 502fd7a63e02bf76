"""fold(): the deployable network computes what the tuned one computes in eval mode, with merging methods
merged away and every Mona replaced by a FoldedMona whose kernels are parameters (issue 21, item 4)."""
import pytest
import torch
from tiny_models import tiny_swin, tiny_vit

import monatune
from monatune.adapters.mona import Mona
from monatune.deploy import FoldedMona, fold
from monatune.models.base import TunedBlockMixin


def _tuned(family: str, method: str, **options) -> torch.nn.Module:
    model = tiny_swin(img_size=56) if family == "swin" else tiny_vit(img_size=32)
    monatune.apply(model, method, **options)
    with torch.no_grad():  # trained-looking adapters: zero-initialised parts (LoRA's B) must not hide a mistake
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _image(family: str) -> torch.Tensor:
    return torch.randn(2, 3, 56, 56) if family == "swin" else torch.randn(2, 3, 32, 32)


def _close(found: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("method", ["mona", "lora", "ssf", "adapter"])
@pytest.mark.parametrize("family", ["swin", "vit"])
def test_folded_network_gives_the_tuned_networks_eval_output(family, method):
    model, x = _tuned(family, method), _image(family)
    with torch.no_grad():
        expected = model(x)
        folded = fold(model, inplace=False)
        _close(folded(x), expected)
        _close(model(x), expected)  # inplace=False left the tuned network as it was
    assert not any(isinstance(m, Mona) for m in folded.modules())
    assert not any(p.requires_grad for p in folded.parameters()) and not folded.training
    tuned_blocks = [m for m in folded.modules() if isinstance(m, TunedBlockMixin)]
    if method in ("lora", "ssf"):  # merged into the weights: plain timm blocks, no adapter operation left
        assert not tuned_blocks and not monatune.is_tuned(folded)
    else:
        assert tuned_blocks
        assert (method == "mona") == any(isinstance(m, FoldedMona) for m in folded.modules())


def test_folded_mona_equals_mona_on_maps_prefixed_tokens_and_packed_tokens():
    mona = Mona(24, bottleneck=8, kernel_sizes=(3, 5, 7)).eval()
    with torch.no_grad():
        for p in mona.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        folded = FoldedMona.from_mona(mona)
        assert folded.conv.weight.shape == (8, 1, 7, 7)  # one depthwise kernel
        x = torch.randn(2, 5, 6, 24)
        _close(folded(x), mona(x))
        tokens = torch.randn(2, 2 + 4 * 5, 24)
        _close(folded(tokens, hw=(4, 5), num_prefix_tokens=2), mona(tokens, hw=(4, 5), num_prefix_tokens=2))
        packed = torch.randn(1, (1 + 3 * 3) + (1 + 2 * 4), 24)
        _close(folded(packed, hw=[(3, 3), (2, 4)], num_prefix_tokens=1), mona(packed, hw=[(3, 3), (2, 4)], num_prefix_tokens=1))


def test_only_the_active_adapter_is_kept_and_disabled_adapters_leave_the_base():
    model = _tuned("vit", "mona")
    monatune.apply(model, "lora", adapter_name="other", rank=4)
    x = _image("vit")
    with torch.no_grad():
        expected = model(x)  # the first adapter (mona) is active
        folded = fold(model, inplace=False)
        _close(folded(x), expected)
        assert not any("other" in name for name, _ in folded.named_modules())
        monatune.disable_adapters(model)
        base = model(x)
        _close(fold(model, inplace=False)(x), base)


def test_the_torchscript_onnx_exporter_takes_the_folded_kernels(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model, x = _tuned("vit", "mona"), _image("vit")
    folded = fold(model)
    path = tmp_path / "vit.onnx"
    with torch.no_grad():
        expected = folded(x)
        torch.onnx.export(folded, (x,), str(path), dynamo=False, input_names=["image"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _close(torch.from_numpy(session.run(None, {"image": x.numpy()})[0]), expected)
    convs = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    monas = sum(isinstance(m, FoldedMona) for m in folded.modules())
    assert monas == 4 and len(convs) == 1 + monas  # the patch embedding's, then one per Mona (not the release's three)


def test_a_network_without_adapters_is_refused():
    with pytest.raises(ValueError, match="nothing to fold"):
        fold(tiny_vit())
