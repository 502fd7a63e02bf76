"""monatune.load_pretrained: official Swin / timm / OpenMMLab files, safety, and mismatching files.

Every model is a tiny timm model built with pretrained=False; the "official" Microsoft Swin
file is built here from a timm state dict by moving patch merging to the end of the previous
stage, renaming ``head.fc.`` to ``head.`` and adding the buffers the original repo saves.
"""
import random
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

import monatune
from monatune import UnsafeCheckpointError, load_pretrained

SWIN = "swin_tiny_patch4_window7_224"
TINY = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
NUM_WINDOWS = {0: 64, 1: 16, 2: 4}  # 56², 28², 14² maps in 7x7 windows; stage 3 (7x7) has no shift
OUTPUT_NORMS = [f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")]


class Obj:  # a custom class: a file holding one needs a full unpickle
    def __init__(self):
        self.note = "not a tensor"


def swin(seed, **overrides):
    torch.manual_seed(seed)
    return timm.create_model(SWIN, pretrained=False, **{**TINY, "num_classes": 10, **overrides}).eval()


def vit(seed):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=10).eval()


def dense(seed):
    torch.manual_seed(seed)
    return monatune.build_dense_backbone(SWIN, model_kwargs=TINY).eval()


def to_official(model):
    """The state dict of a timm Swin, laid out as the original Microsoft repo saves it."""
    out = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        out[k.replace("head.fc.", "head.")] = v
    for i, stage in enumerate(model.layers):
        for j in range(len(stage.blocks)):
            attn = f"layers.{i}.blocks.{j}.attn."
            out[attn + "relative_position_index"] = torch.randint(0, 169, (49, 49), dtype=torch.int64)
            if j % 2 and i in NUM_WINDOWS:
                out[attn + "attn_mask"] = torch.full((NUM_WINDOWS[i], 49, 49), -100.0)
    return out


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, expected, skip=()):
    state = model.state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        if not k.startswith(skip):
            assert torch.equal(state[k], v), k


@pytest.fixture(scope="module")
def original():
    return swin(0)


@pytest.fixture(scope="module")
def official_file(original, tmp_path_factory):
    sd = to_official(original)
    assert "layers.0.downsample.reduction.weight" in sd and "layers.3.downsample.reduction.weight" not in sd
    assert "head.weight" in sd and "layers.1.blocks.1.attn.attn_mask" in sd
    path = tmp_path_factory.mktemp("official") / "swin_official.pth"
    torch.save({"model": sd}, path)
    return path


def test_official_swin_into_timm_classifier(original, official_file):
    model = swin(1)
    assert not torch.equal(model.layers[1].downsample.reduction.weight, original.layers[1].downsample.reduction.weight)
    report = load_pretrained(model, official_file)
    assert report.format == "official-swin"
    assert (report.missing, report.skipped) == ([], [])
    assert set(report.loaded) == set(model.state_dict())
    assert_state_equal(model, original.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)


def test_official_swin_into_dense_backbone(original, official_file):
    backbone = dense(1)
    report = load_pretrained(backbone, official_file)
    assert report.format == "official-swin"
    assert sorted(report.skipped) == ["head.fc.bias", "head.fc.weight", "norm.bias", "norm.weight"]
    assert sorted(report.missing) == sorted(OUTPUT_NORMS)
    reference = original.state_dict()
    for k, v in backbone.state_dict().items():
        if k in OUTPUT_NORMS:
            assert torch.equal(v, torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v)), k
        else:
            assert torch.equal(v, reference[k]), k


def test_official_swin_into_mona_tuned_classifier(original, official_file):
    model = monatune.apply(swin(1), "mona")
    adapters = {k: v for k, v in snapshot(model).items() if ".after_attn." in k or ".after_mlp." in k}
    assert "layers.0.blocks.0.after_attn.default.project1.weight" in adapters
    report = load_pretrained(model, official_file)
    assert sorted(report.missing) == sorted(adapters) and report.skipped == []
    assert_state_equal(model, {**original.state_dict(), **adapters})


def test_official_swin_into_other_class_count(original, official_file):
    model = swin(1, num_classes=3)
    head = snapshot(model.head)
    report = load_pretrained(model, official_file)
    assert sorted(report.skipped) == ["head.fc.bias", "head.fc.weight"]
    assert sorted(report.missing) == ["head.fc.bias", "head.fc.weight"]
    assert set(report.loaded) == set(model.state_dict()) - {"head.fc.bias", "head.fc.weight"}
    assert_state_equal(model.head, head)
    expected = {**original.state_dict(), **{f"head.{k}": v for k, v in head.items()}}
    assert_state_equal(model, expected)


@pytest.mark.parametrize("make", [swin, vit], ids=["swin", "vit"])
@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_timm_files(make, suffix, tmp_path):
    source, target = make(0), make(1)
    path = tmp_path / f"m.{suffix}"
    if suffix == "safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    report = load_pretrained(target, path)
    assert report.format == "timm" and (report.missing, report.skipped) == ([], [])
    assert_state_equal(target, source.state_dict())


def test_mmlab_file_into_dense_backbone(tmp_path):
    source, target = dense(0), dense(1)
    sd = {"backbone." + k: v for k, v in source.state_dict().items()}
    sd["neck.x.weight"] = torch.ones(3)
    torch.save({"meta": {"epoch": 12, "mmdet_version": "3.3.0"}, "state_dict": sd}, tmp_path / "mm.pth")
    report = load_pretrained(target, tmp_path / "mm.pth")
    assert report.format == "mmlab"
    assert (report.skipped, report.missing) == (["neck.x.weight"], [])
    assert_state_equal(target, source.state_dict())


def test_pickle_needing_file_is_refused_unless_allowed(tmp_path):
    source, target = swin(0), swin(1)
    before = snapshot(target)
    path = tmp_path / "unsafe.pth"
    torch.save({"model": source.state_dict(), "extra": Obj()}, path)
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
        load_pretrained(target, path)
    assert_state_equal(target, before)
    assert load_pretrained(target, path, allow_pickle=True).format == "timm"
    assert_state_equal(target, source.state_dict())


BAD_FILES = {
    "random.pth": random.Random(0).randbytes(2000),
    "zip.pth": b"PK\x03\x04" + b"\x00" * 64,
    "corrupt.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}",
    "random.safetensors": random.Random(1).randbytes(300),
    "text.pth": b"hello world\n" * 10,
    "notes.pth": b"this is not a checkpoint\n",
    "empty.pth": b"",
}
@pytest.mark.parametrize("name", [
    "random.pth", "zip.pth", "corrupt.safetensors", "random.safetensors",
    "text.pth",  # torch raises KeyError/IndexError/EOFError for these
    "notes.pth",
    "empty.pth",
])
def test_non_checkpoint_files_raise_value_error(name, tmp_path):
    model = swin(1)
    before = snapshot(model)
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name])
    with pytest.raises(ValueError) as info:
        load_pretrained(model, path)
    assert str(path) in str(info.value)
    assert_state_equal(model, before)


def test_garbage_pth_is_not_reported_as_unsafe(tmp_path):
    path = tmp_path / "random.pth"
    path.write_bytes(BAD_FILES["random.pth"])
    with pytest.raises(ValueError) as info:
        load_pretrained(swin(1), path)
    assert not isinstance(info.value, UnsafeCheckpointError), str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pretrained(swin(1), tmp_path / "nope.pth")


def _save(kind, path):
    if kind == "bigger-swin":
        torch.save({"model": to_official(swin(0, embed_dim=48, num_heads=(2, 4, 8, 16)))}, path)
    elif kind == "deeper-swin":
        torch.save({"model": to_official(swin(0, depths=(2, 2, 4, 2)))}, path)
    else:
        torch.save(vit(0).state_dict(), path)
    return path


@pytest.mark.parametrize("kind, expected", [
    ("bigger-swin", ["'patch_embed.proj.weight' has shape (48, 3, 4, 4) in the file but (32, 3, 4, 4) in the model"]),
    ("vit", ["'cls_token' is in the file but not in the model",
             "'patch_embed.proj.bias' has shape (192,) in the file but (32,) in the model"]),
    ("deeper-swin", []),
], ids=["bigger-swin", "vit", "deeper-swin"])
def test_wrong_architecture_raises_and_leaves_model_unchanged(kind, expected, tmp_path):
    model = swin(1)
    before = snapshot(model)
    path = _save(kind, tmp_path / f"{kind}.pth")
    with pytest.raises(ValueError) as info:
        load_pretrained(model, path)
    message = str(info.value)
    assert str(path) in message and "another architecture" in message
    for text in expected:
        assert text in message
    assert_state_equal(model, before)


def test_deeper_swin_error_lists_extra_keys(tmp_path):
    path = _save("deeper-swin", tmp_path / "deeper.pth")
    with pytest.raises(ValueError) as info:
        load_pretrained(swin(1), path)
    assert re.search(r"'layers\.2\.blocks\.[23]\.\S+' is in the file but not in the model", str(info.value)), str(info.value)


def test_vit_into_swin_error_reports_the_files_own_shape(tmp_path):
    path = _save("vit", tmp_path / "vit.pth")
    with pytest.raises(ValueError) as info:
        load_pretrained(swin(1), path)
    assert "'patch_embed.proj.weight' has shape (192, 3, 16, 16) in the file" in str(info.value), str(info.value)


def test_forced_formats_that_do_not_match_the_file_are_explained(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(swin(0).state_dict(), path)
    with pytest.raises(ValueError, match="no adapter tensors .* not a checkpoint trained with the Mona release; it looks like a timm file"):
        load_pretrained(swin(1), path, format="release")
    with pytest.raises(ValueError, match="no `backbone.` tensors"):
        load_pretrained(swin(1), path, format="mmlab")
