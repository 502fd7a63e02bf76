"""transformers ViT, DINOv2 (with registers), Swin, Swin V2 and SAM vision encoder (models/hf.py): the tuned layers,
the methods that apply to each, and agreement with timm's Swin and ViT given the same weights."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from family_checks import check_identity, check_round_trip, check_training_step
from transformers import (
    Dinov2Config,
    Dinov2WithRegistersConfig,
    SamVisionConfig,
    SwinConfig,
    Swinv2Config,
    ViTConfig,
)
from transformers.models.dinov2.modeling_dinov2 import Dinov2Model
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import Dinov2WithRegistersModel
from transformers.models.sam.modeling_sam import SamVisionModel
from transformers.models.swin.modeling_swin import SwinModel
from transformers.models.swinv2.modeling_swinv2 import Swinv2Model
from transformers.models.vit.modeling_vit import ViTLayer, ViTModel

import monatune
from monatune.methods import METHODS
from monatune.models.hf import PatchGrid

TOKENS = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
WINDOWS = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[1, 2], window_size=4)
MASK = torch.zeros(2, 16, dtype=torch.bool)
MASK[:, ::3] = True  # masked patches, so that DINOv2-with-registers' mask token (always built) trains


def _sam() -> SamVisionModel:
    # initializer_range: SAM's default, 1e-10, starts every weight near zero
    config = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8, window_size=3, global_attn_indexes=[1], mlp_dim=64,
                             initializer_range=0.02)  # fmt: skip
    return SamVisionModel(config)


#: name -> (make_model, input for the training steps, an input of another size for the identity check, last block).
FAMILIES = {
    "vit": (lambda: ViTModel(ViTConfig(intermediate_size=64, **TOKENS)), torch.randn(2, 3, 32, 32),
            (torch.randn(1, 3, 40, 48), None, True), "layers.1"),  # interpolate_pos_encoding: a 5 x 6 grid
    "dinov2": (lambda: Dinov2Model(Dinov2Config(mlp_ratio=2, use_mask_token=False, **TOKENS)),
               torch.randn(2, 3, 32, 32), torch.randn(1, 3, 40, 48), "encoder.layer.1"),
    "dinov2_registers": (lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2,
                                                                                    **TOKENS)),
                         (torch.randn(2, 3, 32, 32), MASK), torch.randn(1, 3, 40, 48), "encoder.layer.1"),
    "swin": (lambda: SwinModel(SwinConfig(**WINDOWS)), torch.randn(2, 3, 32, 32), torch.randn(1, 3, 36, 44),
             "encoder.layers.1.blocks.0"),  # 9 x 11: padded windows and patch merging
    "swinv2": (lambda: Swinv2Model(Swinv2Config(**WINDOWS)), torch.randn(2, 3, 32, 32), torch.randn(1, 3, 36, 28),
               "encoder.layers.1.blocks.0"),
    "sam": (_sam, torch.randn(2, 3, 32, 32), torch.randn(1, 3, 32, 32), "vision_encoder.layers.1"),
}  # fmt: skip
PROMPTED = {"vit", "dinov2", "dinov2_registers"}  # the layers with a `prompt` slot (VPT)
ALL_LORA = ("q", "k", "v", "proj", "fc1", "fc2")


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_adapters_change_nothing(family):
    make, _, other_size, _ = FAMILIES[family]
    check_identity(make(), other_size, "mona", bottleneck=8)
    check_identity(make(), other_size, "lora", modules=ALL_LORA, rank=2)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_changes_exactly_the_method_params(family, method):
    make, x, _, last_block = FAMILIES[family]
    if method == "vpt" and family not in PROMPTED:
        model = make()
        with pytest.raises(ValueError, match="vpt needs tokens that can be prepended, which transformers"):
            monatune.apply(model, "vpt")
        assert not monatune.is_tuned(model)
        return
    options = {"rank": 2, "modules": ALL_LORA} if method == "lora" else {}
    check_training_step(make, method, x, last_block=last_block, **options)


def test_vpt_layer_is_the_plain_layer_on_the_prompted_sequence():
    model = ViTModel(ViTConfig(intermediate_size=64, **TOKENS)).eval()
    plain = copy.deepcopy(model.layers[0])
    monatune.apply(model, "vpt", num_tokens=3)
    layer = model.layers[0]
    x = torch.randn(2, 17, 32)
    prompts = layer.prompt.default.tokens.expand(2, -1, -1)
    with torch.no_grad():
        expected = plain(torch.cat([x[:, :1], prompts, x[:, 1:]], 1))
        got = layer(x)
    torch.testing.assert_close(got, torch.cat([expected[:, :1], expected[:, 4:]], 1))


@pytest.mark.parametrize("family", ["vit", "dinov2_registers"])
def test_the_token_grid_follows_the_input_and_leaves_with_the_adapters(family):
    make, _, other_size, _ = FAMILIES[family]
    model = monatune.apply(make(), "mona", bottleneck=8).eval()
    layers = [m for m in model.modules() if isinstance(m, monatune.models.base.TunedBlockMixin)]
    grid = layers[0].token_grid
    assert isinstance(grid, PatchGrid) and all(layer.token_grid is grid for layer in layers)
    assert (grid.hw, grid.num_prefix_tokens) == ((4, 4), 1 if family == "vit" else 3)
    with torch.no_grad():
        model(*other_size) if isinstance(other_size, tuple) else model(other_size)
    assert grid.hw == (5, 6)
    monatune.unapply(model)
    assert type(model).__name__ in ("ViTModel", "Dinov2WithRegistersModel")
    assert not any(isinstance(h, PatchGrid) for m in model.modules() for h in m._forward_pre_hooks.values())
    assert not any("token_grid" in m.__dict__ or "_monatune_grid" in m.__dict__ for m in model.modules())


def test_a_layer_outside_its_model_is_refused():
    layers = ViTModel(ViTConfig(intermediate_size=64, **TOKENS)).layers
    with pytest.raises(ValueError, match="no ViT/DINOv2 `embeddings` around them"):
        monatune.apply(layers, "mona")


def test_the_methods_that_apply():
    assert set(METHODS) == {"full", "fixed", "bitfit", "norm", "partial-1", "ssf", "lora", "mona", "adapter",
                            "adaptformer", "lorand", "vpt"}  # fmt: skip
    model = Dinov2Model(Dinov2Config(use_swiglu_ffn=True, **TOKENS))
    with pytest.raises(ValueError, match=r"transformers DINOv2 blocks have no fc1.*\['q', 'k', 'v', 'proj'\]"):
        monatune.apply(model, "lora", modules=["fc1"])
    check_identity(model, torch.randn(1, 3, 32, 32), "mona", bottleneck=8)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_round_trip(family, tmp_path):
    make, x, _, _ = FAMILIES[family]
    check_round_trip(make(), "mona", x, tmp_path, bottleneck=8)


# ---------------------------------------------------------------- the same network in timm and transformers


def _qkv(state: dict, prefix: str, qkv: str) -> None:
    """Split timm's fused ``qkv`` (q, k, v stacked on the output dim) into transformers' q/k/v projections."""
    for part in ("weight", "bias"):
        for name, t in zip(("q_proj", "k_proj", "v_proj"), state.pop(f"{qkv}.{part}").chunk(3)):
            state[f"{prefix}.{name}.{part}"] = t


#: timm block parameter -> transformers layer parameter (Swin and ViT alike; q, k, v are split apart).
_BLOCK_NAMES = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
                "attn.relative_position_bias_table": "attention.relative_position_bias.relative_position_bias_table"}
_VIT_NAMES = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
              "patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"}  # fmt: skip


def _rename(rest: str, names: dict) -> str:
    """``rest`` with its longest prefix found in ``names`` replaced."""
    for old in sorted(names, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return names[old] + rest[len(old) :]
    return rest


def _timm_swin_to_hf(timm_state: dict) -> dict:
    """timm Swin v1 weights under transformers ``SwinModel`` names. timm's stage i > 0 starts with the patch
    merging that transformers puts at the end of stage i - 1 (both concatenate the 2 x 2 neighbours in the
    order (0,0), (1,0), (0,1), (1,1), then norm, then reduction)."""
    out = {}
    for key, t in timm_state.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        parts = key.split(".")
        if parts[0] in ("patch_embed", "norm"):
            out[_rename(key, {"patch_embed.proj": "embeddings.patch_embeddings.projection",
                              "patch_embed.norm": "embeddings.norm", "norm": "layernorm"})] = t  # fmt: skip
        elif parts[2] == "downsample":
            out[f"encoder.layers.{int(parts[1]) - 1}.downsample.{'.'.join(parts[3:])}"] = t
        else:  # layers.i.blocks.j.<rest>
            out[f"encoder.layers.{parts[1]}.blocks.{parts[3]}.{_rename('.'.join(parts[4:]), _BLOCK_NAMES)}"] = t
    for key in [k for k in out if k.endswith("attn.qkv.weight")]:
        _qkv(out, key.replace("attn.qkv.weight", "attention"), key[: -len(".weight")])
    return out


def _timm_vit_to_hf(timm_state: dict) -> dict:
    out = {}
    for key, t in timm_state.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            out[f"layers.{parts[1]}.{_rename('.'.join(parts[2:]), _BLOCK_NAMES)}"] = t
        else:
            out[_rename(key, _VIT_NAMES)] = t
    for key in [k for k in out if k.endswith("attn.qkv.weight")]:
        _qkv(out, key.replace("attn.qkv.weight", "attention"), key[: -len(".weight")])
    return out


def _agree(timm_model, hf_model, to_hf, x, features, directory) -> None:
    """Same weights -> same features; then a Mona adapter trained (here: perturbed) on the timm model, saved, and
    loaded into the transformers model (block by block, by position) gives the same features there too."""
    missing, unexpected = hf_model.load_state_dict(to_hf(timm_model.state_dict()), strict=False)
    assert not unexpected and not [k for k in missing if "pooler" not in k], (missing, unexpected)
    timm_model.eval(), hf_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(features(hf_model, x), timm_model.forward_features(x), atol=1e-5, rtol=1e-5)
        plain = features(hf_model, x)
    monatune.apply(timm_model, "mona", bottleneck=8)
    with torch.no_grad():
        for _, _, adapter in monatune.adapter_modules(timm_model):
            for p in adapter.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    monatune.save_adapter(timm_model, directory)
    monatune.load_adapter(hf_model, directory, check_base=False)  # other block names: mapped by position
    with torch.no_grad():
        expected, got = timm_model.forward_features(x), features(hf_model, x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the adapters did something


def test_timm_swin_and_transformers_swin_agree_with_and_without_mona(tmp_path):
    timm_model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=32,
                                   depths=(2, 2), num_heads=(1, 2), num_classes=0)  # fmt: skip
    with torch.no_grad():  # timm starts the bias tables at zero-ish trunc-normal; make them count
        for name, p in timm_model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 0.5)
    hf_model = SwinModel(SwinConfig(image_size=56, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[1, 2],
                                    window_size=7))  # fmt: skip
    _agree(timm_model, hf_model, _timm_swin_to_hf, torch.randn(2, 3, 56, 56),
           lambda m, x: m(x).last_hidden_state.unflatten(1, (7, 7)), tmp_path)  # timm: (B, H, W, C), final norm


def test_timm_vit_and_transformers_vit_agree_with_and_without_mona(tmp_path):
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                                   depth=2, num_heads=2, mlp_ratio=2.0, num_classes=0)  # fmt: skip
    hf_model = ViTModel(ViTConfig(intermediate_size=64, layer_norm_eps=1e-6, **TOKENS))
    _agree(timm_model, hf_model, _timm_vit_to_hf, torch.randn(2, 3, 32, 32), lambda m, x: m(x).last_hidden_state,
           tmp_path)


def test_tuned_layers_keep_the_transformers_layer_contract():
    """transformers records hidden states with hooks on the layer classes (isinstance): tuned layers still count."""
    model = ViTModel(ViTConfig(intermediate_size=64, **TOKENS)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain = model(x, output_hidden_states=True).hidden_states
        monatune.apply(model, "mona", bottleneck=8)
        tuned = model(x, output_hidden_states=True).hidden_states
    assert isinstance(model.layers[0], ViTLayer) and len(tuned) == len(plain) == 3  # embeddings, 2 layers
    torch.testing.assert_close(tuned[0], plain[0])
    assert not torch.allclose(tuned[1], plain[1])  # recorded after the tuned layer, Mona included
