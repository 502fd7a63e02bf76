"""Tuned models under torch.compile with dynamic shapes, and the tasks' ``compile`` option (issue 21, items 1-2).

Inductor on CPU costs tens of seconds per graph when its cache is cold, so inductor compiles two networks:
the Mona-tuned classifier's training step with dynamic sizes, and a detector's training step under the
``compile`` option (static shapes, in size buckets). The other methods and the segmenter under the option are
captured by dynamo + AOT autograd (``aot_eager``: the same graphs, symbolic shapes and backward, without code
generation), the dense backbones (a ViT's maps, the windowed families) by dynamo alone. Sizes are marked dynamic
and the batch left static, as a task runs them (``dynamic=True`` made batch and channels symbolic too, which
cost the capture a third more time for nothing these tests check).
"""
import pytest
import timm
import torch

import monatune
from monatune.compiling import INDUCTOR_OPTIONS
from monatune.tasks.classification import ImageClassifier

# dynamic_img_pad: without it timm's patch embedding checks divisibility with an f-string naming the size, and
# formatting a symbolic size specialises it (one graph per size)
TINY_VIT = dict(depth=1, embed_dim=32, num_heads=2, dynamic_img_size=True, dynamic_img_pad=True)


def _compare_grads(a: torch.nn.Module, b: torch.nn.Module, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _vit_and_twin(method: str, **options) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny tuned ViT and an eager copy with the same weights."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **TINY_VIT)
    monatune.apply(model, method, **options)
    twin = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **TINY_VIT)
    monatune.apply(twin, method, **options)
    twin.load_state_dict(model.state_dict())
    return model, twin


def _step_matches_eager(compiled, model, twin, size, rtol: float, atol: float) -> None:
    """Forward and backward of ``compiled`` at ``size``: output and every gradient equal to ``twin``'s."""
    model.zero_grad(), twin.zero_grad()
    x = torch.randn(2, 3, *size)
    torch._dynamo.mark_dynamic(x, (2, 3))  # the sizes symbolic from the first call (an error if one is specialised)
    y, expected = compiled(x), twin(x)
    torch.testing.assert_close(y, expected, rtol=rtol, atol=atol)
    y.square().sum().backward()
    expected.square().sum().backward()
    _compare_grads(twin, model)


# Inductor's C++ backend vectorises each kernel only after an analysis that runs sympy over every symbolic
# stride (``TilingSelect``): on two cores that analysis was half of a cold dynamic compile (a tiny ViT's inference:
# 64 s with it, 46 s without). The inductor tests below turn vectorisation off (``cpp.simdlen=1``): the same
# graphs, symbolic shapes, lowering, fusion and generated C++, compiled and run, in scalar loops.
SCALAR_INDUCTOR = {**INDUCTOR_OPTIONS, "cpp.simdlen": 1}


def test_a_mona_tuned_classifier_trains_under_inductor_with_dynamic_sizes():
    """One graph for two sizes, outputs and gradients equal to eager. Mona's second size used to fail in inductor
    (a saved channels-last view, see MonaOp.forward; and layout optimisation, see monatune.compiling)."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model, twin = _vit_and_twin("mona", bottleneck=8, dropout=0.0)
    # the sizes dynamic, the batch static: ``dynamic=True`` makes every size symbolic, and the symbolic batch and
    # channels cost inductor's code generation a tenth more time on two cores for nothing the test checks
    compiled = torch.compile(model, fullgraph=True, options=SCALAR_INDUCTOR)
    model.train(), twin.train()
    graphs = []  # dynamo's count after each size (a cold inductor cache may add graphs of its own at the first)
    for size in [(48, 80), (64, 112)]:  # tokens with a class token: Mona's prefix path
        _step_matches_eager(compiled, model, twin, size, rtol=1e-4, atol=1e-5)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0]  # no recompile for the second size


@pytest.mark.parametrize("method", ["lora", "adapter", "lorand", "vpt"])  # a leaf, two block-slot modules, prompts
def test_every_method_captures_whole_with_dynamic_sizes(method):
    """Forward and backward at two sizes, one graph (``fullgraph``: no graph break), equal to eager (eval mode:
    no dropout to draw differently; gradients still flow)."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model, twin = _vit_and_twin(method)
    model.eval(), twin.eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # sizes marked dynamic, the batch static
    for size in [(32, 48), (64, 32)]:
        _step_matches_eager(compiled, model, twin, size, rtol=1e-5, atol=1e-6)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


WINDOWED = {
    # a plain ViT: its tokens back to maps at any size (what a segmenter's or detector's inference runs); inductor runs
    # the same Mona ViT at two sizes in the classifier test above
    "vit_tiny_patch16_224": ({"depth": 1, "embed_dim": 32, "num_heads": 2}, [(64, 96), (80, 48)]),
    # the last stage has at least two windows a side: a side of one window is a 0/1 size torch specialises;
    # sizes that are and are not whole windows, odd and even
    "swin_tiny_patch4_window7_224": ({"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1),
                                      "window_size": 2}, [(96, 128), (128, 160), (97, 131), (200, 136)]),
    # Hiera, and SAM 2's (HieraDet: timm's padded windows as monatune's partition, models/hiera.py); both pad the input
    # to 32, the output maps cropped as Swin's
    "hiera_tiny_224": ({"embed_dim": 16, "num_heads": 1, "stages": (1, 1, 1, 1)}, [(64, 96), (97, 131), (128, 64)]),
    "sam2_hiera_tiny": ({"embed_dim": 16, "num_heads": 1, "stages": (1, 1, 1, 1), "global_att_blocks": (2,),
                         "window_spec": (4, 4, 4, 2)}, [(128, 160), (97, 131), (256, 128)]),
    # SAM ViT: its window partition, crop and relative positions written for symbolic sizes (models/sam_vit.py); a
    # map side equal to the pretrained grid's (4 here) is a second graph: there timm does not resample positions
    "samvit_base_patch16": ({"img_size": 64, "embed_dim": 32, "depth": 2, "num_heads": 2, "window_size": 3,
                             "global_attn_indexes": (1,)}, [(80, 96), (97, 131), (128, 80)]),
    # timm's Swin V2: its blocks and patch merging as Swin's (models/swin_v2.py); windows of 4, shifted in stage 0
    "swinv2_tiny_window8_256": ({"img_size": 64, "window_size": 4, "embed_dim": 16, "depths": (2, 1, 1, 1),
                                 "num_heads": (1, 1, 1, 1)}, [(96, 128), (97, 131), (200, 136)]),
    # other families: any size, or sizes padded to 32 (ConvNeXt's stem and downsampling convs guard on the rest)
    "eva02_tiny_patch14_224": ({"depth": 1}, [(64, 96), (97, 131), (128, 64)]),
    "resnet18": ({"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128)}, [(64, 96), (97, 131), (128, 64)]),
    "convnext_tiny": ({"dims": (16, 32, 64, 128), "depths": (1, 1, 1, 1)}, [(64, 96), (96, 128), (128, 64)]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(WINDOWED))
def test_a_dense_backbone_is_one_graph_for_every_input_size(name):
    """Swin: the release's padded windows and timm's patch merging written as ceiling divisions, the shift mask
    built in the graph (models/swin.py); Hiera: its token order built in the graph (models/hiera.py); SAM ViT (see
    models/sam_vit.py). Before, each size compiled a new graph (for a Swin-T, minutes each)."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    torch._dynamo.reset()
    model_kwargs, sizes = WINDOWED[name]
    backbone = monatune.build_dense_backbone(name, "mona", bottleneck=8, model_kwargs=model_kwargs).eval()
    graphs = CompileCounter()  # dynamo alone: the symbolic shapes and guards, no code generation
    compiled = torch.compile(backbone, backend=graphs)
    with torch.no_grad():
        for size in sizes:
            x = torch.randn(1, 3, *size)
            torch._dynamo.mark_dynamic(x, (2, 3))  # symbolic sizes, a static batch (as a segmenter's inference runs)
            expected, out = backbone(x), compiled(x)
            for key in expected:
                torch.testing.assert_close(out[key], expected[key], rtol=1e-5, atol=1e-5)
    assert graphs.frame_count == 1


def test_a_tuned_transformers_swin_is_one_graph_for_every_input_size():
    """transformers' Swin as monatune tunes it: its layers' windows written as the dense Swin's, its patch embedding
    and merging padding with ceil_div while tuned (models/hf.py); before, a graph per size (~100 s each). Untuning
    gives transformers' classes back."""
    from transformers import SwinConfig
    from transformers.models.swin.modeling_swin import SwinModel, SwinPatchEmbeddings, SwinPatchMerging
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    torch._dynamo.reset()
    config = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[1, 2], window_size=4)
    model = monatune.apply(SwinModel(config), "mona", bottleneck=8).eval()
    graphs = CompileCounter()
    compiled = torch.compile(model, backend=graphs)
    with torch.no_grad():
        for size in [(64, 96), (97, 131), (128, 64)]:  # padded windows, odd sizes merged, a shifted window
            x = torch.randn(1, 3, *size)
            torch._dynamo.mark_dynamic(x, (2, 3))
            torch.testing.assert_close(compiled(x).last_hidden_state, model(x).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert graphs.frame_count == 1
    assert type(model.embeddings.patch_embeddings) is not SwinPatchEmbeddings  # monatune's, while tuned
    monatune.unapply(model)
    assert type(model.embeddings.patch_embeddings) is SwinPatchEmbeddings
    assert type(model.encoder.layers[0].downsample) is SwinPatchMerging


def test_the_compile_option_compiles_the_segmenter_and_trains_on_its_crops():
    """The option (static shapes: a segmenter trains on fixed crops) on a Mona-tuned UperNet: logits, loss and
    gradients of a training step equal to the eager network's (no dropout to draw differently). Captured whole by
    dynamo + AOT autograd: inductor's code for a UperNet training step cost two minutes of the suite's two cores
    (58 kernels, each its own g++ run). Inductor runs the classifier's and the detector's training steps here; its
    compile of this segmenter's step is timed by benchmarks/compile.py (docs/benchmarks.md)."""
    from monatune.tasks.segmentation import SemanticSegmenter

    torch.manual_seed(0)
    torch._dynamo.reset()
    tasks = [
        SemanticSegmenter("vit_tiny_patch16_224", method="mona", num_classes=3, channels=8, aux_channels=8,
                          method_options={"bottleneck": 8, "dropout": 0.0}, dropout=0.0, crop=(32, 32),
                          model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, **compile_)
        for compile_ in ({"compile": {"backend": "aot_eager"}}, {})
    ]  # fmt: skip
    for task in tasks:
        task.configure_model()
        task.train()
    compiled, plain = tasks
    assert compiled.model._compiled_call_impl is not None and plain.model._compiled_call_impl is None
    plain.model.load_state_dict(compiled.model.state_dict())
    x, target = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    logits, expected = compiled(x), plain(x)
    assert logits.shape == (2, 3, 32, 32)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    for task, out in ((compiled, logits), (plain, expected)):
        task.loss(out, target).backward()
    _compare_grads(plain.tuned, compiled.tuned, rtol=1e-3, atol=1e-4)
    assert all(p.grad is not None for p in compiled.tuned.parameters() if p.requires_grad)


def test_the_compile_option_compiles_the_classifier_and_trains():
    torch.manual_seed(0)
    torch._dynamo.reset()
    task = ImageClassifier("vit_tiny_patch16_224", method="mona", num_classes=3, method_options={"bottleneck": 8},
                           model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32},
                           compile={"backend": "aot_eager"})  # fmt: skip
    task.configure_model()
    assert task.model._compiled_call_impl is not None
    plain = ImageClassifier("vit_tiny_patch16_224", method="mona", num_classes=3, method_options={"bottleneck": 8},
                            model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32})  # fmt: skip
    plain.configure_model()
    assert set(plain.model.state_dict()) == set(task.model.state_dict())  # checkpoints and adapters keep their keys
    plain.model.load_state_dict(task.model.state_dict())
    task.eval(), plain.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(task(x), plain(x), rtol=1e-5, atol=1e-6)


def test_a_detector_compiled_by_inductor_trains_on_its_size_buckets():
    """The ``compile`` option's default (inductor, static shapes) on a LoRA-tuned RetinaNet: its backbone and FPN see
    only the bucket's size, and the losses and gradients are those of the same network run by dynamo alone.

    In float64: the head's ReLUs have inputs at (or within 1e-7 of) zero, where float32 rounding picks the subgradient,
    and with one positive anchor that moved some float32 gradients by 1% between any two runs (dynamo alone was as far
    from a float64 run as inductor was)."""
    from monatune.tasks.detection import ObjectDetector

    torch.manual_seed(0)
    torch._dynamo.reset()
    tasks = [
        ObjectDetector("vit_tiny_patch16_224", detector="retinanet", num_classes=2, method="lora", min_size=64,
                       max_size=96, model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2},
                       compile={"size_buckets": 128, **extra})
        for extra in ({"options": {"cpp.simdlen": 1}}, {"backend": "eager"})  # see SCALAR_INDUCTOR
    ]  # fmt: skip
    for task in tasks:
        task.configure_model()
        task.train().double()
    compiled, reference = tasks
    reference.model.load_state_dict(compiled.model.state_dict())
    seen = []
    compiled.model.backbone.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]], dtype=torch.float64), "labels": torch.tensor([1])}
    for size in [(64, 80), (72, 96), (96, 64)]:  # three padded sizes, one bucket
        image = torch.rand(3, *size, dtype=torch.float64)
        losses, expected = (task.model([image.clone()], [dict(target)]) for task in tasks)
        for key in expected:
            torch.testing.assert_close(losses[key], expected[key], rtol=1e-10, atol=1e-12)
        for task, loss in ((compiled, losses), (reference, expected)):
            task.model.zero_grad()
            sum(loss.values()).backward()
        _compare_grads(reference.model, compiled.model, rtol=1e-7, atol=1e-10)
    assert seen == [(128, 128)] * 3
