"""Dense backbone: release parity on awkward sizes, shapes, ViT form, converter."""
import json

import pytest
import torch
from tiny_models import TINY_SWIN
from release_reference import ReleaseSwinMona, randomize_, release_state_dict

import monatune
from monatune.models.swin import TunedSwinBlock

SIZES = [(2, 3, 100, 75), (1, 3, 64, 64), (1, 3, 29, 37), (1, 3, 224, 160)]


@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
    torch.manual_seed(0)
    reference = randomize_(ReleaseSwinMona(**TINY_SWIN), seed=0).eval()
    path = tmp_path_factory.mktemp("release") / "mona_release.pth"
    torch.save(release_state_dict(reference), path)
    return reference, path


def _dense(method="mona"):
    return monatune.build_dense_backbone("swin_tiny_patch4_window7_224", method, model_kwargs=TINY_SWIN).eval()


@pytest.mark.parametrize("shape", SIZES)
def test_release_checkpoint_gives_the_release_features(release_file, shape):
    reference, path = release_file
    backbone = _dense()
    report = monatune.load_pretrained(backbone, path)
    assert report.format == "release" and report.missing == []
    assert sorted(report.skipped) == ["neck.lateral_convs.0.conv.bias", "neck.lateral_convs.0.conv.weight", "rpn_head.rpn_conv.weight"]
    x = torch.randn(shape)
    with torch.no_grad():
        expected, got = reference(x), backbone(x)
    assert list(got) == ["0", "1", "2", "3"]
    for e, g in zip(expected, got.values()):
        assert e.shape == g.shape
        assert (e - g).abs().max() < 1e-4 * e.abs().max()


def test_timm_default_windows_would_not_match(release_file):
    """Control: with timm's own partition (shift after pad, shrinking windows) the features differ."""
    reference, path = release_file
    backbone = _dense()
    monatune.load_pretrained(backbone, path)
    for block in backbone.modules():
        if isinstance(block, TunedSwinBlock):
            block.release_windows = False
    x = torch.randn(1, 3, 100, 75)
    with torch.no_grad():
        diff = (reference(x)[3] - backbone(x)["3"]).abs().max()
    assert diff > 1e-2


def test_converter_writes_an_adapter_that_reproduces_the_release(release_file, tmp_path):
    reference, path = release_file
    out = monatune.convert_release_checkpoint(path, tmp_path / "adapter", "swin_tiny_patch4_window7_224", model_kwargs=TINY_SWIN)
    _assert_adapter_reproduces_release(reference, out, tmp_path, (1, 3, 100, 75))


def _assert_adapter_reproduces_release(reference, adapter_dir, tmp_path, shape):
    """Base weights as a user has them (the release file's frozen tensors) + the adapter = the release."""
    base_sd = {k: v for k, v in release_state_dict(reference)["state_dict"].items() if "my_module" not in k}
    torch.save({"meta": {}, "state_dict": base_sd}, tmp_path / "base.pth")
    backbone = _dense(method=None)
    monatune.load_pretrained(backbone, tmp_path / "base.pth")
    monatune.load_adapter(backbone, adapter_dir)
    x = torch.randn(shape)
    with torch.no_grad():
        for e, g in zip(reference(x), backbone(x).values()):
            assert (e - g).abs().max() < 1e-4 * e.abs().max()


def test_convert_command(release_file, tmp_path, capsys):
    from monatune.cli import main

    reference, path = release_file
    out = tmp_path / "out"
    tiny = ["--model", "swin_tiny_patch4_window7_224", "--model-kwargs", json.dumps(TINY_SWIN)]
    assert main(["convert", str(path), str(out), *tiny]) == 0
    assert "wrote mona adapter" in capsys.readouterr().out
    _assert_adapter_reproduces_release(reference, out, tmp_path, (1, 3, 61, 47))
    # The full-size architecture for a tiny file: refused, naming the mismatch, nothing written.
    assert main(["convert", str(path), str(tmp_path / "x"), "--model", "swin_tiny_patch4_window7_224"]) == 2
    assert "does not fit swin_tiny_patch4_window7_224" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "x"), *tiny]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert", str(path), str(tmp_path / "x"), "--model", "swin_tiny_patch4_window7_224", "--model-kwargs", "[1]"]) == 2
    assert "must be a JSON object" in capsys.readouterr().err


def test_swin_s3_shares_the_block():
    backbone = monatune.build_dense_backbone("swin_s3_tiny_224", "mona")
    assert [tuple(f.shape) for f in backbone(torch.randn(1, 3, 100, 90)).values()] == [
        (1, 96, 25, 23), (1, 192, 13, 12), (1, 384, 7, 6), (1, 768, 4, 3)]
    assert sum(1 for _ in monatune.adapter_modules(backbone)) == 2 * 12


def test_swin_shapes_channels_and_strides():
    backbone = _dense()
    assert backbone.out_channels == [32, 64, 128, 256] and backbone.strides == [4, 8, 16, 32]
    feats = backbone(torch.randn(2, 3, 100, 75))
    assert [tuple(f.shape) for f in feats.values()] == [(2, 32, 25, 19), (2, 64, 13, 10), (2, 128, 7, 5), (2, 256, 4, 3)]
    names = {n for n, _ in backbone.named_parameters()}
    assert {"norm0.weight", "norm3.bias"} <= names and not any(n.startswith(("head.", "norm.")) for n in names)
    assert not backbone.norm2.weight.requires_grad  # output norms frozen under Mona


@pytest.mark.parametrize("name,kwargs,prefix", [
    ("vit_small_patch16_224", dict(depth=4, embed_dim=64, num_heads=2, reg_tokens=2), 3),
    ("eva02_tiny_patch14_224", dict(depth=4), 1),
])
def test_vit_dense_backbone_any_size(name, kwargs, prefix):
    backbone = monatune.build_dense_backbone(name, "mona", model_kwargs=kwargs)
    assert backbone.out_indices == [0, 1, 2, 3] and backbone.num_prefix_tokens == prefix
    p = backbone.strides[0]
    for size in [(100, 75), (64, 96)]:
        feats = backbone(torch.randn(1, 3, *size))
        grid = (-(-size[0] // p), -(-size[1] // p))
        assert [tuple(f.shape[-2:]) for f in feats.values()] == [grid] * 4
        assert backbone.blocks[0].token_grid.hw == grid
    sum(f.sum() for f in feats.values()).backward()
    assert backbone.blocks[3].after_mlp.default.project1.weight.grad is not None


def test_unknown_architectures():
    with pytest.raises(ValueError, match="unknown timm model 'swin_huge'"):
        monatune.build_dense_backbone("swin_huge")
    with pytest.raises(ValueError, match="mobilenetv3_small_050.*families dense backbones are built for"):
        monatune.build_dense_backbone("mobilenetv3_small_050")
