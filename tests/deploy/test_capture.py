"""A Mona-tuned model captures like a plain one: torch.jit.trace, torch.export and both ONNX exporters (run in
ONNX Runtime) give eager PyTorch's outputs; the fused autograd function steps aside by itself (issue 21, item 3).
torch.jit.script takes what timm's scripting takes (in-place methods, LoRA merged by fold())."""
import pytest
import torch
from tiny_models import tiny_swin, tiny_vit

import monatune

onnxruntime = pytest.importorskip("onnxruntime")


def _tuned(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_swin(img_size=56) if family == "swin" else tiny_vit(img_size=32)
    monatune.apply(model, "mona", bottleneck=8)
    with torch.no_grad():
        for _, _, adapter in monatune.adapter_modules(model):
            for p in adapter.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _image(family: str) -> torch.Tensor:
    return torch.randn(2, 3, 56, 56) if family == "swin" else torch.randn(2, 3, 32, 32)


def _onnx_outputs(path, x: torch.Tensor):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("family", ["swin", "vit"])
def test_trace_and_export_give_eager_outputs(family):
    model, x = _tuned(family), _image(family)
    with torch.no_grad():
        expected = model(x)
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), expected, rtol=1e-4, atol=1e-5)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
@pytest.mark.parametrize("family", ["swin", "vit"])
def test_both_onnx_exporters_run_in_onnxruntime(tmp_path, family, dynamo):
    pytest.importorskip("onnxscript") if dynamo else pytest.importorskip("onnx")
    model, x = _tuned(family), _image(family)
    path = tmp_path / f"{family}.onnx"
    with torch.no_grad():
        expected = model(x)
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["image"], output_names=["logits"])
    torch.testing.assert_close(_onnx_outputs(path, x), expected, rtol=1e-4, atol=1e-5)


def test_the_fused_function_still_runs_in_eager_mode():
    model, x = _tuned("vit"), _image("vit")
    calls = []
    from monatune.adapters import mona as mona_module

    original = mona_module._MonaFunction.run
    mona_module._MonaFunction.run = staticmethod(lambda *a: calls.append(1) or original(*a))
    try:
        with torch.no_grad():
            model(x)
            assert calls, "eager inference should use the fused path"
            calls.clear()
            torch.jit.trace(model, x, check_trace=False)
            assert not calls, "tracing must get the plain operations"
    finally:
        mona_module._MonaFunction.run = original


@pytest.mark.parametrize("method", ["bitfit", "lora"])
def test_torch_jit_script_takes_what_timm_scripting_takes(method):
    from monatune.deploy import fold

    torch.manual_seed(0)
    model = tiny_vit(img_size=32)
    monatune.apply(model, method)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    x = _image("vit")
    with torch.no_grad():
        expected = model(x)
        deployable = model if method == "bitfit" else fold(model, inplace=False)  # LoRA merged: plain timm
        torch.testing.assert_close(torch.jit.script(deployable)(x), expected, rtol=1e-4, atol=1e-5)
