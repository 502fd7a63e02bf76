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


class _Tensors(torch.nn.Module):
    """A dense network's dict of maps as a tuple: what tracing and the ONNX exporters take as outputs."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.network(x).values())


DENSE_SWIN = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 2}


def _dense_network(task: str) -> torch.nn.Module:
    """A Mona-tuned UperNet, or a Mona-tuned RetinaNet's backbone and FPN (what a detector exports), in eval."""
    from monatune.tasks import ObjectDetector, SemanticSegmenter

    torch.manual_seed(0)
    options = {"method": "mona", "method_options": {"bottleneck": 8}, "model_kwargs": DENSE_SWIN}
    if task == "segmenter":
        module = SemanticSegmenter("swin_tiny_patch4_window7_224", num_classes=3, channels=8, aux_channels=8, **options)
    else:
        module = ObjectDetector("swin_tiny_patch4_window7_224", detector="retinanet", num_classes=2, fpn_channels=16,
                                min_size=64, max_size=64, **options)  # fmt: skip
    module.configure_model()
    with torch.no_grad():
        for _, _, adapter in monatune.adapter_modules(module.tuned):
            for p in adapter.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    network = module.model if task == "segmenter" else module.model.backbone
    return _Tensors(network).eval()


@pytest.mark.parametrize("task", ["segmenter", "detector"])
def test_dense_task_networks_trace_and_export(tmp_path, task):
    """The segmenter and the detector's backbone + FPN under torch.jit.trace, torch.export and the TorchScript ONNX
    exporter, the ONNX file with a dynamic batch and image size run at a second size (``monatune export`` runs
    torch.export and the dynamo exporter on both: tests/deploy/test_export.py). UperNet's pyramid pooling exports as
    matrix products (models/segmentation.py, ``PyramidPool``)."""
    pytest.importorskip("onnx")
    network, x, other = _dense_network(task), torch.randn(2, 3, 64, 64), torch.randn(1, 3, 96, 64)
    path = str(tmp_path / "net.onnx")
    with torch.no_grad():
        expected = network(x) + network(other)
        trace = torch.jit.trace(network, x, check_trace=False)
        export = torch.export.export(network, (x,)).module()
        torch.onnx.export(network, (x,), path, dynamo=False, input_names=["image"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}})  # fmt: skip
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        captured = {
            "trace": trace(x) + trace(other),
            "export": export(x),
            "onnx": [torch.from_numpy(a) for image in (x, other) for a in session.run(None, {"image": image.numpy()})],
        }
    expected_export = expected[: len(expected) // 2]
    assert len(expected) == 2 * (1 if task == "segmenter" else 5)
    for how, outputs in captured.items():
        wanted = expected_export if how == "export" else expected
        assert len(outputs) == len(wanted), how
        for found, want in zip(outputs, wanted):
            atol = 1e-4 * want.abs().max().item()
            torch.testing.assert_close(found, want, rtol=1e-4, atol=atol, msg=lambda m: f"{how}: {m}")


def test_a_dense_vit_resamples_its_positions_under_the_torchscript_onnx_exporter(tmp_path):
    """timm resamples a ViT's position embedding to the grid with antialiased bicubic; the TorchScript exporter gets
    it from monatune (models/onnx_symbolics.py: ONNX Resize with antialias), exported with a dynamic image size and
    run in ONNX Runtime at grids smaller, larger and other than the pretrained 4 x 4."""
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    backbone = monatune.build_dense_backbone("vit_tiny_patch16_224", "mona", bottleneck=8, model_kwargs={
        "img_size": 64, "depth": 1, "embed_dim": 32, "num_heads": 2}).eval()  # fmt: skip
    with torch.no_grad():
        backbone.pos_embed.normal_()  # a position embedding whose resampling shows
    network, path = _Tensors(backbone).eval(), str(tmp_path / "vit.onnx")
    sizes = [(1, 3, 96, 48), (2, 3, 32, 80), (1, 3, 160, 112)]
    with torch.no_grad():
        torch.onnx.export(network, (torch.randn(*sizes[0]),), path, dynamo=False, input_names=["image"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}})  # fmt: skip
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        for size in sizes:
            x = torch.randn(*size)
            found = [torch.from_numpy(a) for a in session.run(None, {"image": x.numpy()})]
            for got, want in zip(found, network(x), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
