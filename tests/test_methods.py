"""Every method: the release's counts, exactly what trains, adapter-only round trip, both model forms."""
import copy
import json

import pytest
import timm
import torch
from tiny_models import TINY_SWIN, tiny_swin, tiny_vit
from torch import nn

import monatune
from monatune import METHODS, build_dense_backbone, count_parameters
from monatune.cli import main

# spec section 4 / issue 3: trainable backbone parameters of the released dense backbone.
RELEASE_COUNTS = {
    "full": (86_745_016, 194_998_164),
    "fixed": (0, 0),
    "bitfit": (201_656, 302_484),
    "norm": (59_392, 89_088),
    "partial-1": (12_601_632, 28_339_632),
    "adapter": (3_107_328, 4_659_456),
    "adaptformer": (1_553_664, 2_329_728),
    "lora": (3_080_192, 4_620_288),
    "mona": (3_667_456, 5_267_712),
}
SWIN_B, SWIN_L = "swin_base_patch4_window7_224", "swin_large_patch4_window7_224"

# Where each method's own modules live (None: it trains the model's weights instead).
SLOT_OF = {
    "adapter": (".attn_out.", ".mlp_out."),
    "adaptformer": (".mlp_parallel.",),
    "lorand": (".attn_out.", ".mlp_out."),
    "mona": (".after_attn.", ".after_mlp."),
    "lora": (".lora.",),
    "ssf": (".ssf.",),
    "vpt": (".prompt.",),
}


@pytest.mark.parametrize("method", list(RELEASE_COUNTS))
def test_release_counts_on_swin_b_and_l(method):
    for name, expected in zip((SWIN_B, SWIN_L), RELEASE_COUNTS[method]):
        with torch.device("meta"):
            report = count_parameters(build_dense_backbone(name, method))
        assert report.trainable_backbone == report.trainable == expected, (name, method)
        assert report.total - report.adapter == RELEASE_COUNTS["full"][name == SWIN_L]


def test_lorand_defaults_give_the_papers_1_20m_on_swin_b():
    with torch.device("meta"):
        report = count_parameters(build_dense_backbone(SWIN_B, "lorand"))
    assert report.trainable == 1_197_312  # the docstring's number; the paper reports 1.20M


def test_params_command_reports_each_method(capsys):
    assert main(["params", SWIN_B, "--method", "lora", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_backbone"] == 3_080_192
    assert main(["params", SWIN_B, "--method", "lora", "-o", "rank=8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_backbone"] == 3_080_192 // 8
    assert main(["params", SWIN_B, "--method", "lora", "-o", "ranks=8"]) == 2
    assert "unknown option(s) ['ranks'] for method 'lora'" in capsys.readouterr().err


# ---------------------------------------------------------------- what trains


def _model(family, form):
    if form == "cls":
        return tiny_swin(img_size=56) if family == "swin" else tiny_vit(img_size=32, reg_tokens=2)
    if family == "swin":
        return build_dense_backbone("swin_tiny_patch4_window7_224", model_kwargs=dict(TINY_SWIN))
    return build_dense_backbone("vit_tiny_patch16_224", model_kwargs=dict(depth=3, reg_tokens=2))


def _input(family, form):
    if form == "cls":
        return torch.randn(2, 3, 56, 56) if family == "swin" else torch.randn(2, 3, 32, 32)
    return torch.randn(2, 3, 45, 61)  # any size in the dense form


def _loss(out):
    feats = out.values() if isinstance(out, dict) else [out]
    return sum((f.float() ** 2).mean() for f in feats)


def _expected_trainable(model, method, family, form):
    """The method's trainable set, written from names and module types (not from the method's code)."""
    names = [n for n, _ in model.named_parameters()]
    head = {n for n in names if n.startswith("head.")} if form == "cls" else set()
    own = [n for n in names if not n.startswith("head.") and ".default." not in n]
    if method == "full":
        return set(names)
    if method == "fixed":
        return head
    if method == "bitfit":
        return head | {n for n in own if "bias" in n}
    if method == "norm":
        norms = [m for m, mod in model.named_modules() if isinstance(mod, nn.LayerNorm) and ".default" not in m]
        return head | {n for n in own if n.rsplit(".", 1)[0] in norms}
    if method == "partial-1":
        last = "layers.3.blocks.1." if family == "swin" else f"blocks.{len(model.blocks) - 1}."
        return head | {n for n in own if n.startswith(last)}
    return head | {n for n in names if any(s + "default." in n for s in SLOT_OF[method])}


@pytest.mark.parametrize("form", ["cls", "dense"])
@pytest.mark.parametrize("family", ["swin", "vit"])
@pytest.mark.parametrize("method", list(METHODS))
def test_exactly_the_methods_parameters_change(method, family, form):
    model = monatune.apply(_model(family, form), method, head="auto" if form == "cls" else None)
    expected = _expected_trainable(model, method, family, form)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert expected or method == "fixed"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    # Adam moves every parameter with a non-zero gradient by about lr, however small the gradient.
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2) if expected else None
    model.train()
    for _ in range(2 if opt else 0):  # two steps: LoRA's A only moves once B has left zero
        opt.zero_grad()
        _loss(model(_input(family, form))).backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
@pytest.mark.parametrize("family", ["swin", "vit"])
def test_adapter_only_round_trip(tmp_path, method, family):
    base = _model(family, "cls").eval()
    tuned = monatune.apply(copy.deepcopy(base), method)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    x = _input(family, "cls")
    expected = tuned(x)
    monatune.save_adapter(tuned, tmp_path / method)
    saved = monatune.adapter_state_dict(tuned)
    assert sum(t.numel() for t in saved.values()) == count_parameters(tuned).trainable
    loaded = monatune.load_adapter(copy.deepcopy(base), tmp_path / method)
    assert torch.equal(loaded(x), expected)
    assert not torch.equal(base(x), expected)


def test_full_saves_every_weight_and_round_trips(tmp_path):
    base = tiny_swin(img_size=56).eval()
    tuned = monatune.apply(copy.deepcopy(base), "full")
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    monatune.save_adapter(tuned, tmp_path / "full")
    loaded = monatune.load_adapter(copy.deepcopy(base), tmp_path / "full")
    x = _input("swin", "cls")
    assert torch.equal(loaded(x), tuned(x))


# ---------------------------------------------------------------- method details


def test_adapter_and_adaptformer_blocks_compute_the_release_equations():
    for method in ("adapter", "adaptformer", "lorand"):
        model = monatune.apply(tiny_swin(img_size=56).eval(), method)
        block = model.layers[1].blocks[1]
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        x = torch.randn(2, 14, 14, 64)
        if method == "adaptformer":
            x1 = x + block._attn(block.norm1(x))
            expected = x1 + block.mlp(block.norm2(x1)) + block.mlp_parallel["default"](x1)
        else:
            x1 = x + block.attn_out["default"](block._attn(block.norm1(x)))
            expected = x1 + block.mlp_out["default"](block.mlp(block.norm2(x1)))
        assert torch.allclose(block(x), expected, atol=1e-6), method


def test_adaptformer_branch_is_scaled_and_has_no_skip():
    model = monatune.apply(tiny_swin(img_size=56).eval(), "adaptformer", scale=0.5)
    branch = model.layers[0].blocks[0].mlp_parallel["default"]
    y = torch.randn(3, 32)
    assert torch.allclose(branch(y), 0.5 * branch.project2(torch.nn.functional.gelu(branch.project1(y))))


def _vit_reference(model, x, prompts, deep):
    """ViT with VPT written out: prompts after the prefix tokens, timm's own block forward."""
    from timm.models.vision_transformer import Block

    P, n = model.num_prefix_tokens, prompts[0].shape[0]
    h = model._pos_embed(model.patch_embed(x))
    for i, block in enumerate(model.blocks):
        if deep or i == 0:  # deep: fresh prompts replace the previous block's prompt outputs
            h = torch.cat([h[:, :P], prompts[i if deep else 0].expand(x.shape[0], -1, -1), h[:, P:]], dim=1)
        h = Block.forward(block, h)
        if deep or i == len(model.blocks) - 1:
            h = torch.cat([h[:, :P], h[:, P + n :]], dim=1)
    return model.forward_head(model.norm(h))


@pytest.mark.parametrize("deep", [True, False])
def test_vpt_on_vit_is_prompt_tokens_after_the_prefix(deep):
    model = monatune.apply(tiny_vit(img_size=32, reg_tokens=2, depth=3).eval(), "vpt", num_tokens=4, deep=deep)
    prompts = [b.prompt["default"].tokens for b in model.blocks if b.prompt["default"].tokens is not None]
    assert len(prompts) == (3 if deep else 1)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x), _vit_reference(model, x, prompts, deep), atol=1e-5)


def test_vpt_shallow_on_swin_carries_prompts_through_every_stage():
    model = monatune.apply(tiny_swin(img_size=56).eval(), "vpt", deep=False, num_tokens=3)
    learned = [n for n, p in model.named_parameters() if p.requires_grad and ".prompt." in n]
    assert learned == ["layers.0.blocks.0.prompt.default.tokens"]
    carriers = [b.prompt["default"] for s in model.layers for b in s.blocks]
    assert [c.merge_layer is not None for c in carriers] == [False, False, True, False, True, False, True, False]
    x = torch.randn(2, 3, 56, 56)
    out = model(x)
    out.sum().backward()
    assert model.layers[0].blocks[0].prompt["default"].tokens.grad.abs().sum() > 0
    # The prompts reach the last stage: changing them changes a last-stage block's attention.
    stage3 = model.layers[3].blocks[0]
    seen = {}
    stage3.register_forward_hook(lambda m, a, o: seen.setdefault("out", o.detach().clone()))
    with torch.no_grad():
        model(x)
        first = seen.pop("out")
        model.layers[0].blocks[0].prompt["default"].tokens.add_(1.0)
        model(x)
    assert not torch.allclose(first, seen["out"])


def test_vpt_refuses_eva_and_bad_options():
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1)
    with pytest.raises(ValueError, match="vpt needs tokens that can be prepended, which timm EVA"):
        monatune.apply(eva, "vpt")
    assert not monatune.is_tuned(eva)
    with pytest.raises(ValueError, match="`num_tokens` must be a positive int, got 0"):
        monatune.apply(tiny_vit(), "vpt", num_tokens=0)


def test_lora_options_choose_the_projections():
    model = monatune.apply(tiny_vit(), "lora", rank=4, alpha=8, modules=("q", "k", "v", "proj", "fc1"))
    block = model.blocks[0]
    assert block.attn.qkv.lora["default"].slices == (0, 1, 2)
    assert block.attn.proj.lora["default"].scaling == 2.0
    assert "default" in block.mlp.fc1.lora and not hasattr(block.mlp.fc2, "lora")
    with pytest.raises(ValueError, match=r"`modules` must be a non-empty subset of \('q', 'k', 'v', 'proj', 'fc1', 'fc2'\)"):
        monatune.apply(tiny_vit(), "lora", modules=("query",))


def test_lora_and_ssf_on_eva_whose_attention_bypasses_the_qkv_forward():
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1).eval()
    assert eva.blocks[0].attn.q_bias is not None and eva.blocks[0].attn.qkv_bias_separate is False
    x = torch.randn(1, 3, 224, 224)
    plain = eva(x)
    for method in ("lora", "ssf"):
        monatune.apply(eva, method)
        with torch.no_grad():
            for _, _, adapter in monatune.adapter_modules(eva):
                for p in adapter.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
        qkv_adapter = getattr(eva.blocks[0].attn.qkv, method)["default"]
        calls = []
        handle = qkv_adapter.register_forward_hook(lambda *a: calls.append(1))
        eva(x)
        assert calls, f"{method} on EVA's qkv never ran"
        handle.remove()
        monatune.unapply(eva)
        assert eva.blocks[0].attn.qkv_bias_separate is False
        assert torch.equal(eva(x), plain)


def test_ssf_follows_linears_norms_and_the_patch_embedding():
    model = monatune.apply(tiny_swin(img_size=56), "ssf")
    hosts = {q.rsplit(".", 2)[0] for q, _, _ in monatune.adapter_modules(model)}
    assert {"patch_embed.proj", "patch_embed.norm", "layers.1.downsample.reduction", "layers.1.downsample.norm",
            "layers.0.blocks.0.attn.qkv", "layers.0.blocks.0.attn.proj", "layers.0.blocks.0.mlp.fc1",
            "layers.0.blocks.0.mlp.fc2", "layers.0.blocks.0.norm1", "norm"} <= hosts
    assert not any(h.startswith("head") for h in hosts)


def test_partial_counts_blocks_from_the_end_and_checks_them():
    model = monatune.apply(tiny_vit(depth=3), "partial-1", blocks=2)
    assert {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and n.startswith("blocks.")} == {"1", "2"}
    with pytest.raises(ValueError, match="`blocks` is 4 but the model has only 3 blocks"):
        monatune.apply(tiny_vit(depth=3), "partial-1", blocks=4)


def test_targets_are_for_mona_only():
    with pytest.raises(ValueError, match="`targets=` places map adapters after modules"):
        monatune.apply(timm.create_model("resnet18", pretrained=False), "lora", targets=r"layer\d")


def test_trainability_methods_work_without_block_rules():
    net = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3)
    monatune.apply(net, "bitfit")
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in net.named_parameters() if "bias" in n} | {"classifier.weight"}  # BN biases, the head
    for method in ("norm", "full", "fixed", "ssf"):
        model = monatune.apply(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3), method)
        model(torch.randn(1, 3, 64, 64)).sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad), method
    with pytest.raises(ValueError, match="no block rules for MobileNetV3"):
        monatune.apply(timm.create_model("mobilenetv3_small_050", pretrained=False), "adapter")
