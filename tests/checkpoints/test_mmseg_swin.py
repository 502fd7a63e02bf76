"""load_pretrained reads OpenMMLab's own Swin layout (``mmlab-swin``): mmseg's converted ImageNet files, as
the STAR-MMRotate configs load them, and whole mmdet detector checkpoints.

The files are written here from tiny timm models: first the official Microsoft layout (patch merging
moved to the end of the previous stage), then mmdet's ``swin_converter`` applied to it (written below
from mmdet's ``mmdet/models/utils/ckpt_convert.py``: renames, and the patch-merging channels put in
``nn.Unfold`` order). Loading must give back the same features, not only the same key names.
"""
import re
from collections import OrderedDict

import pytest
import timm
import torch

import monatune
from monatune import load_pretrained

SWIN = "swin_tiny_patch4_window7_224"
TINY = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def swin_converter(ckpt, prefix=""):
    """mmdet 2.x ``swin_converter`` (mmseg's ``swin2mmseg`` is the same without the ``backbone.`` prefix)."""

    def correct_unfold_reduction_order(x):
        out_channel, in_channel = x.shape
        x = x.reshape(out_channel, 4, in_channel // 4)
        return x[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(out_channel, in_channel)

    def correct_unfold_norm_order(x):
        in_channel = x.shape[0]
        x = x.reshape(4, in_channel // 4)
        return x[[0, 2, 1, 3], :].transpose(0, 1).reshape(in_channel)

    new_ckpt = OrderedDict()
    for k, v in ckpt.items():
        if k.startswith("head"):
            continue
        elif k.startswith("layers"):
            new_v = v
            if "attn." in k:
                new_k = k.replace("attn.", "attn.w_msa.")
            elif "mlp." in k:
                if "mlp.fc1." in k:
                    new_k = k.replace("mlp.fc1.", "ffn.layers.0.0.")
                elif "mlp.fc2." in k:
                    new_k = k.replace("mlp.fc2.", "ffn.layers.1.")
                else:
                    new_k = k.replace("mlp.", "ffn.")
            elif "downsample" in k:
                new_k = k
                if "reduction." in k:
                    new_v = correct_unfold_reduction_order(v)
                elif "norm." in k:
                    new_v = correct_unfold_norm_order(v)
            else:
                new_k = k
            new_k = new_k.replace("layers", "stages", 1)
        elif k.startswith("patch_embed"):
            new_v = v
            new_k = k.replace("proj", "projection") if "proj" in k else k
        else:
            new_v, new_k = v, k
        new_ckpt[prefix + new_k] = new_v
    return new_ckpt


def to_official(model):
    """A timm Swin's state dict in the Microsoft layout, with the index buffers the original repo saves."""
    out = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        out[k.replace("head.fc.", "head.")] = v
    for i, stage in enumerate(model.layers):
        for j in range(len(stage.blocks)):
            out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.randint(0, 169, (49, 49))
            if j % 2 and i < 3:
                out[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, 49, 49)
    return out


def dense(seed, method=None, **kwargs):
    torch.manual_seed(seed)
    return monatune.build_dense_backbone(SWIN, method, model_kwargs=TINY, **kwargs).eval()


def randomise_norms(model):
    """Output norms with values a fresh model does not have, so that loading them shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.match(r"norm\d\.", name):
                p.normal_()
    return model


def features(model, x):
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def original():
    return randomise_norms(dense(0))


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(3)
    return torch.randn(2, 3, 72, 88)  # not a multiple of the windows: padding as in the release


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "detector"])
def test_mmseg_swin_file_gives_the_original_features(original, x, tmp_path, wrap):
    converted = swin_converter(to_official(original))
    assert "stages.0.downsample.reduction.weight" in converted and "stages.0.blocks.1.attn.w_msa.qkv.weight" in converted
    if wrap == "plain":
        obj = converted
    elif wrap == "detector":  # a whole mmdet detector: backbone. prefix, a neck and a head
        obj = {"meta": {"mmdet_version": "2.28.2"}, "state_dict": {
            **swin_converter(to_official(original), prefix="backbone."),
            "neck.lateral_convs.0.conv.weight": torch.ones(4, 32, 1, 1), "bbox_head.conv_cls.bias": torch.zeros(3)}}
    else:
        obj = {wrap: converted}
    torch.save(obj, tmp_path / "swin.pth")
    target = dense(1)
    assert not torch.equal(target.layers[1].downsample.reduction.weight, original.layers[1].downsample.reduction.weight)
    report = load_pretrained(target, tmp_path / "swin.pth")
    assert report.format == "mmlab-swin" and report.missing == []
    expected_skipped = ["bbox_head.conv_cls.bias", "neck.lateral_convs.0.conv.weight"] if wrap == "detector" else []
    assert sorted(report.skipped) == expected_skipped
    reference = original.state_dict()
    for k, v in target.state_dict().items():
        assert torch.equal(v, reference[k]), k
    ours, theirs = features(target, x), features(original, x)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


def test_the_patch_merging_channel_order_is_what_makes_the_features_equal(original, x, tmp_path):
    """A file renamed like mmdet's but with the channels left in the official order loads, with other features."""
    official = to_official(original)
    renamed = {
        k.replace("layers", "stages", 1).replace("attn.", "attn.w_msa.").replace("mlp.fc1.", "ffn.layers.0.0.")
        .replace("mlp.fc2.", "ffn.layers.1.").replace("patch_embed.proj.", "patch_embed.projection."): v
        for k, v in official.items() if not k.startswith("head")
    }
    torch.save(renamed, tmp_path / "unordered.pth")
    target = dense(1)
    load_pretrained(target, tmp_path / "unordered.pth")
    assert not torch.equal(target.layers[1].downsample.reduction.weight, original.layers[1].downsample.reduction.weight)
    assert not torch.allclose(features(target, x)["3"], features(original, x)["3"])


def test_mmseg_swin_file_into_a_timm_classifier(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model(SWIN, pretrained=False, num_classes=7, **TINY).eval()
    torch.save({"state_dict": swin_converter(to_official(source))}, tmp_path / "swin.pth")
    torch.manual_seed(1)
    target = timm.create_model(SWIN, pretrained=False, num_classes=7, **TINY).eval()
    report = load_pretrained(target, tmp_path / "swin.pth")
    assert report.format == "mmlab-swin"
    assert sorted(report.missing) == ["head.fc.bias", "head.fc.weight"]  # mmdet's converter drops the classifier
    for k, v in target.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, source.state_dict()[k]), k
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(target.forward_features(image), source.forward_features(image), rtol=0, atol=0)


def test_star_layout_into_a_mona_tuned_backbone_without_output_norms(original, tmp_path):
    """STAR's case: the 22k file (no output norms) into a Mona-tuned backbone returning stages 1-3."""
    sd = {k: v for k, v in swin_converter(to_official(original)).items() if not re.match(r"norm\d\.", k)}
    torch.save(sd, tmp_path / "swin.pth")
    target = dense(1, "mona", out_indices=[1, 2, 3])
    adapters = sorted(k for k in target.state_dict() if ".after_attn." in k or ".after_mlp." in k)
    report = load_pretrained(target, tmp_path / "swin.pth")
    assert sorted(report.missing) == sorted(adapters + [f"norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")])
    assert report.skipped == []


def test_mmdet_relative_position_index_is_timms():
    """mmdet's WindowMSA builds its index differently (``double_step_seq`` then a flip); the tables mean the same."""
    wh = ww = 7

    def double_step_seq(step1, len1, step2, len2):  # mmdet's WindowMSA.double_step_seq
        seq1 = torch.arange(0, step1 * len1, step1)
        seq2 = torch.arange(0, step2 * len2, step2)
        return (seq1[:, None] + seq2[None, :]).reshape(1, -1)

    coords = double_step_seq(2 * ww - 1, wh, 1, ww)
    mmdet_index = (coords + coords.T).flip(1)
    timm_index = dense(0).layers[0].blocks[0].attn.relative_position_index
    assert torch.equal(mmdet_index, timm_index)


def test_forcing_mmlab_swin_on_another_layout_is_explained(tmp_path):
    torch.save(dense(0).state_dict(), tmp_path / "timm.pth")
    with pytest.raises(ValueError, match="no OpenMMLab Swin tensors .* it looks like a timm file"):
        load_pretrained(dense(1), tmp_path / "timm.pth", format="mmlab-swin")
