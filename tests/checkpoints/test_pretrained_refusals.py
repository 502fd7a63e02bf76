"""load_pretrained refuses what it cannot load faithfully, says why, and changes nothing (issue 17: 8a, 11, 12).

Malicious pickles are refused as unsafe (their code never runs), broken files as unreadable, a
directory as a directory, and integer tensors for floating-point weights as such.
"""
import os
import pickle
import random

import pytest
import timm
import torch
from safetensors.torch import save_file
from tiny_models import tiny_swin

from monatune import UnsafeCheckpointError, load_pretrained
from monatune.cli import main


class Payload:
    """Unpickling this runs ``touch <marker>``: the file must never appear."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def write_malicious(kind, path, marker):
    content = {"model": {"w": torch.ones(2)}, "extra": Payload(marker)}
    if kind == "torch.save":
        torch.save(content, path)
    elif kind == "torch.save legacy":
        torch.save(content, path, _use_new_zipfile_serialization=False)
    else:  # pickle.dump with an old or new protocol, no torch zip around it
        with open(path, "wb") as f:
            pickle.dump({"extra": Payload(marker), "w": 1}, f, protocol=int(kind.removeprefix("pickle protocol ")))


MALICIOUS = ["torch.save", "torch.save legacy", *(f"pickle protocol {p}" for p in range(pickle.HIGHEST_PROTOCOL + 1))]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", MALICIOUS)
def test_malicious_pickle_is_refused_as_unsafe_and_never_runs(kind, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    write_malicious(kind, path, marker)
    model = tiny_swin()
    before = snapshot(model)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pretrained(model, path)
    message = str(info.value)
    assert message.startswith(f"'{path}' contains Python objects besides tensors") and "\n" not in message
    assert "allow_pickle=True (command line: --allow-pickle)" in message
    assert not marker.exists()
    assert_unchanged(model, before)


def test_the_refused_function_is_named(tmp_path):
    path = tmp_path / "evil.pth"
    write_malicious("torch.save", path, tmp_path / "pwned")
    with pytest.raises(UnsafeCheckpointError, match=r"\(it refers to (posix|nt|os)\.system\)"):
        load_pretrained(tiny_swin(), path)


def test_command_line_refuses_a_malicious_file_with_the_hint(tmp_path, capsys):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    write_malicious("torch.save", path, marker)
    out = tmp_path / "adapter"
    assert main(["convert", str(path), str(out), "--model", "swin_tiny_patch4_window7_224"]) == 2
    err = capsys.readouterr().err
    assert "contains Python objects besides tensors" in err and "--allow-pickle" in err and "Traceback" not in err
    assert not marker.exists() and not out.exists()


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def broken_file(kind, path):
    good = path.with_suffix(".good")
    if kind == "random bytes":
        path.write_bytes(random.Random(0).randbytes(4000))
    elif kind == "truncated torch.save":
        torch.save({"w": torch.randn(64, 64)}, good)
        path.write_bytes(_truncated(good.read_bytes()))
    elif kind == "truncated legacy torch.save":
        torch.save({"w": torch.randn(64, 64)}, good, _use_new_zipfile_serialization=False)
        path.write_bytes(_truncated(good.read_bytes()))
    elif kind == "truncated pickle":
        path.write_bytes(_truncated(pickle.dumps({"a": list(range(100)), "b": "x" * 100}, protocol=2)))
    else:  # a zip that is not a torch file
        import zipfile

        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "not a checkpoint")


@pytest.mark.parametrize(
    "kind", ["random bytes", "truncated torch.save", "truncated legacy torch.save", "truncated pickle", "other zip"]
)
def test_broken_file_is_unreadable_not_unsafe(kind, tmp_path):
    path = tmp_path / "broken.pth"
    broken_file(kind, path)
    model = tiny_swin()
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        load_pretrained(model, path)
    assert not isinstance(info.value, UnsafeCheckpointError), str(info.value)
    assert str(info.value).startswith(f"'{path}' is not a readable PyTorch checkpoint")
    assert_unchanged(model, before)


# ---------------------------------------------------------------- a directory instead of a file


@pytest.mark.parametrize("content, hint", [
    ([], ""),
    (["weights.safetensors", "notes.txt"], "; it holds one: '{dir}/weights.safetensors'"),
    (["a.pth", "b.bin"], "; it holds 2: 'a.pth', 'b.bin'"),
    (["adapter_config.json", "adapter_model.safetensors"],
     "; it is a monatune adapter directory: load it with monatune.load_adapter(model, '{dir}')"),
])  # fmt: skip
def test_a_directory_is_named_as_one_with_what_to_give(tmp_path, content, hint):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in content:
        (folder / name).write_bytes(b"")
    with pytest.raises(ValueError) as info:
        load_pretrained(tiny_swin(), folder)
    assert str(info.value) == (
        f"'{folder}' is a directory; give a checkpoint file (.pth, .pt, .bin, .safetensors){hint.format(dir=folder)}"
    )


def test_a_missing_file_still_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tiny_swin(), tmp_path / "nope.pth")


# ---------------------------------------------------------------- integer tensors for floating-point weights


def test_int32_safetensors_are_refused_naming_tensors_and_dtypes(tmp_path):
    source, target = tiny_swin(), tiny_swin()
    before = snapshot(target)
    path = tmp_path / "int.safetensors"
    save_file({k: (v * 100).to(torch.int32) if v.is_floating_point() else v for k, v in source.state_dict().items()}, path)
    with pytest.raises(ValueError) as info:
        load_pretrained(target, path)
    message = str(info.value)
    assert message.startswith(f"checkpoint '{path}' has integer tensors where swin_tiny_patch4_window7_224 has "
                              "floating-point ones")  # fmt: skip
    assert "'patch_embed.proj.weight' is int32 in the file but float32 in the model" in message
    assert "save the weights as floating point" in message and "\n" not in message
    assert_unchanged(target, before)


def test_one_int64_tensor_in_a_pth_is_refused(tmp_path):
    source, target = tiny_swin(), tiny_swin()
    before = snapshot(target)
    state = source.state_dict()
    state["layers.1.blocks.0.mlp.fc1.weight"] = state["layers.1.blocks.0.mlp.fc1.weight"].long()
    torch.save(state, tmp_path / "one.pth")
    with pytest.raises(ValueError, match=r"^checkpoint .*: 'layers\.1\.blocks\.0\.mlp\.fc1\.weight' is int64 in the file "
                                         r"but float32 in the model\. They would not convert"):  # fmt: skip
        load_pretrained(target, tmp_path / "one.pth")
    assert_unchanged(target, before)


def test_integer_buffers_integer_in_both_still_load_and_floats_for_them_are_refused(tmp_path):
    def resnet(seed):
        torch.manual_seed(seed)
        return timm.create_model("resnet10t", pretrained=False, num_classes=3)

    source, target = resnet(0), resnet(1)
    source.bn1.num_batches_tracked.fill_(7)
    torch.save(source.state_dict(), tmp_path / "r.pth")
    load_pretrained(target, tmp_path / "r.pth")
    assert target.bn1.num_batches_tracked.dtype == torch.int64 and int(target.bn1.num_batches_tracked) == 7
    assert torch.equal(target.conv1[0].weight, source.conv1[0].weight)

    state = source.state_dict()
    state["bn1.num_batches_tracked"] = state["bn1.num_batches_tracked"].float() + 0.5
    torch.save(state, tmp_path / "f.pth")
    fresh = resnet(2)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="'bn1.num_batches_tracked' is float32 in the file but int64 in the model"):
        load_pretrained(fresh, tmp_path / "f.pth")
    assert_unchanged(fresh, before)


def test_allow_pickle_must_be_a_bool_not_a_truthy_string(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    write_malicious("torch.save", path, marker)
    with pytest.raises(ValueError, match=r"^`allow_pickle` must be True or False, got 'false'$"):
        load_pretrained(tiny_swin(), path, allow_pickle="false")
    assert not marker.exists()


def test_model_must_be_a_module(tmp_path):
    torch.save(tiny_swin().state_dict(), tmp_path / "w.pth")
    with pytest.raises(TypeError, match="`model` must be a torch nn.Module to load weights into, got OrderedDict"):
        load_pretrained(tiny_swin().state_dict(), tmp_path / "w.pth")
