"""An adapter directory is replaced in one step: every failure, at every write step, and kill -9 at
random moments leave either the complete old adapter or the complete new one, never a mix."""
import copy
import json
import os
import pathlib
import random
import shutil
import signal
import tempfile
import time

import pytest
import torch
from tiny_models import tiny_swin

import monatune
from monatune import atomic
from monatune.checkpoints.adapter import CONFIG_NAME, WEIGHTS_NAME, read_adapter, read_adapter_file

# every call a save makes that touches the disk
WRITE_STEPS = [
    (os, "rename"), (os, "replace"), (os, "fsync"), (pathlib.Path, "write_bytes"), (pathlib.Path, "write_text"),
    (shutil, "copy2"), (shutil, "rmtree"), (tempfile, "mkdtemp"), (atomic, "_exchange"),
]  # fmt: skip


class Injected(Exception):
    pass


def _two_versions():
    base = tiny_swin().eval()
    tuned = monatune.apply(copy.deepcopy(base), "mona")
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(0.1)
    old = {k: v.clone() for k, v in monatune.adapter_state_dict(tuned).items()}
    with torch.no_grad():
        tuned.layers[0].blocks[0].after_attn.default.gamma.add_(1.0)
    new = {k: v.clone() for k, v in monatune.adapter_state_dict(tuned).items()}
    return base, tuned, old, new


def _set(tuned, version):
    """Put the tensors of one version into the model."""
    with torch.no_grad():
        tuned.layers[0].blocks[0].after_attn.default.gamma.copy_(version["layers.0.blocks.0.after_attn.gamma"])


def _which(path, old, new):
    """'old' or 'new': the directory holds one complete adapter (fails on a mix or a broken directory)."""
    _, tensors = read_adapter(path)
    for label, ref in (("old", old), ("new", new)):
        if tensors.keys() == ref.keys() and all(torch.equal(tensors[k], ref[k]) for k in ref):
            return label
    raise AssertionError("the directory holds neither adapter")


def _fail_on_call(monkeypatch, n):
    """Make the n-th disk-touching call of the save raise; returns the call counter."""
    calls = [0]
    for owner, name in WRITE_STEPS:
        real = getattr(owner, name)

        def wrapper(*args, _real=real, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                raise Injected(f"failure injected at call {n}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)
    return calls


def test_a_failure_at_every_write_step_leaves_a_complete_adapter(tmp_path, monkeypatch):
    base, tuned, old, new = _two_versions()
    path = tmp_path / "a"
    _set(tuned, old)
    monatune.save_adapter(tuned, path, extra_files={"task_head.safetensors": b"old head"})
    (path / "README.md").write_text("my notes")
    _set(tuned, new)
    seen = set()
    n = 1
    while True:
        with monkeypatch.context() as m:
            _fail_on_call(m, n)
            try:
                monatune.save_adapter(tuned, path, extra_files={"task_head.safetensors": b"new head"})
                failed = False
            except Injected:
                failed = True
        state = _which(path, old, new)  # checked after every injected failure
        seen.add(state)
        head = read_adapter_file(path, "task_head.safetensors")
        assert head == {"old": b"old head", "new": b"new head"}[state]  # the extra file swaps with the adapter
        assert (path / "README.md").read_text() == "my notes"
        if not failed:
            break
        # undo a completed swap so that the next injection point starts from the old adapter again
        if state == "new":
            _set(tuned, old)
            monatune.save_adapter(tuned, path, extra_files={"task_head.safetensors": b"old head"})
            _set(tuned, new)
        n += 1
    assert n > 8 and seen == {"old", "new"}  # the injections covered steps before and after the swap
    assert _which(path, old, new) == "new"
    assert sorted(os.listdir(tmp_path)) == ["a"]  # the last save cleaned up what the failed ones left
    assert sorted(os.listdir(path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "task_head.safetensors", "README.md"])
    monatune.load_adapter(copy.deepcopy(base), path)


def test_the_two_rename_fallback_recovers_the_old_adapter(tmp_path, monkeypatch):
    """Without renameat2, a crash between moving the old adapter aside and moving the new one in is undone."""
    base, tuned, old, new = _two_versions()
    path = tmp_path / "a"
    _set(tuned, old)
    monatune.save_adapter(tuned, path)
    _set(tuned, new)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def second_rename_fails(src, dst):
        if str(src).rsplit(os.sep, 1)[-1].startswith(".a.saving-"):
            raise Injected("crash after the old adapter was moved aside")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(Injected):
        monatune.save_adapter(tuned, path)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not path.exists() and (tmp_path / ".a.old").is_dir()  # the moment the fallback cannot avoid
    assert _which(path, old, new) == "old"  # a load puts the old adapter back
    monatune.save_adapter(tuned, path)
    assert _which(path, old, new) == "new" and sorted(os.listdir(tmp_path)) == ["a"]


def test_bad_metadata_and_foreign_folders_write_nothing(tmp_path):
    _, tuned, old, new = _two_versions()
    path = tmp_path / "a"
    monatune.save_adapter(tuned, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(ValueError, match="metadata must be JSON-serialisable"):
        monatune.save_adapter(tuned, path, metadata={"when": object()})
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["a"]
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.py").write_text("print(1)")
    with pytest.raises(ValueError, match="folder with other files .*train.py.* new or empty folder"):
        monatune.save_adapter(tuned, folder)
    assert os.listdir(folder) == ["train.py"]


def _save_forever(model: torch.nn.Module, path: pathlib.Path, ready: int) -> None:
    """In a forked child: re-save the adapter as fast as it can, each save's gamma filled with its number."""
    gamma = model.layers[0].blocks[0].after_attn.default.gamma
    i = 0
    while True:
        with torch.no_grad():
            gamma.fill_(float(i))
        monatune.save_adapter(model, path)
        if i == 0:
            os.write(ready, b"ready")
        i += 1


def test_kill_9_during_repeated_saves_never_leaves_a_broken_adapter(tmp_path):
    """A process re-saving an adapter as fast as it can is killed at random moments; the directory
    always loads, holding one save's complete tensors, and the next save leaves no leftovers. The saver is a
    fork of this process (no new interpreter to start for each kill)."""
    import timm

    torch.manual_seed(0)
    model = monatune.apply(timm.create_model("swin_tiny_patch4_window7_224", num_classes=5), "mona")  # ~10 MB file
    path = tmp_path / "a"
    rng = random.Random(0)
    for _ in range(4):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns to pytest
            try:
                os.close(read_end)
                _save_forever(model, path, write_end)
            finally:
                os._exit(1)
        os.close(write_end)
        try:
            assert os.read(read_end, 5) == b"ready", "the saving child died before its first save"
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
        config, tensors = read_adapter(path)  # complete: the config's hash matches the weights
        gamma = tensors["layers.0.blocks.0.after_attn.gamma"]
        assert torch.all(gamma == gamma[0]) and json.loads((path / CONFIG_NAME).read_text()) == config
    monatune.save_adapter(model, path)
    assert sorted(os.listdir(tmp_path)) == ["a"]
