"""Fault injection: runs stopped by SIGTERM, Ctrl-C and kill -9 at random moments resume to exactly the
uninterrupted run (adapters bit for bit, one metrics row per step), and a stopped run never exits 0."""
import csv
import json
import random
import signal
import subprocess

import pytest
import torch
from engine_helpers import REFERENCE_ARGS, monatune_command, run_main, subprocess_env, write_yaml
from safetensors.torch import load_file


def _rows(run_dir):
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _run_with(probe, init_args, configs, tmp_path, run_dir, *extra):
    probe_file = write_yaml(tmp_path / "probe.yaml", {"trainer": {"callbacks": [
        {"class_path": f"probes.{probe}", "init_args": init_args}]}})  # fmt: skip
    args = ["fit", "-c", configs.base, "-c", configs.mona, "--run_dir", run_dir, *REFERENCE_ARGS, *extra]
    cmd = [*monatune_command(), *map(str, args), "-c", str(probe_file)]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path), args


def _assert_same_as_reference(run_dir, fitted_run):
    for name in ("adapter-last", "adapter-best"):
        ref = load_file(fitted_run / name / "adapter_model.safetensors")
        got = load_file(run_dir / name / "adapter_model.safetensors")
        assert sorted(got) == sorted(ref)
        different = [k for k in ref if not torch.equal(ref[k], got[k])]
        assert not different, f"{name}: {len(different)} of {len(ref)} tensors differ, first {different[:3]}"
    ref_results = json.loads((fitted_run / "results.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["steps"], results["best"], results["last"]) == (ref_results["steps"], ref_results["best"], ref_results["last"])
    assert _rows(run_dir) == _rows(fitted_run)  # one row per step and per validation, with the same values


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signalled_fit_exits_nonzero_saves_its_state_and_resumes_exactly(fitted_run, configs, tmp_path, signum, status):
    run_dir = tmp_path / "run"
    stopped, args = _run_with("SignalAtStep", {"step": 7, "signal": int(signum)}, configs, tmp_path, run_dir)
    assert stopped.returncode == status, stopped.stderr[-3000:]
    name = signal.Signals(signum).name
    assert f"monatune fit: stopped by {name}; its state after step 8 is in checkpoints/last.ckpt" in stopped.stderr
    assert "--resume" in stopped.stderr and not (run_dir / "results.json").exists()
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 8  # saved at the stop, not at the last periodic checkpoint (step 6)
    assert run_main(*args, "--resume") == 0
    _assert_same_as_reference(run_dir, fitted_run)


def test_kill_9_during_an_epochs_validation_resumes_with_that_validation(fitted_run, configs, tmp_path):
    """No checkpoint is taken between an epoch's last step and its validation (Lightning would resume past it)."""
    run_dir = tmp_path / "run"
    killed, args = _run_with("KillInValidation", {"epoch": 1}, configs, tmp_path, run_dir)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert run_main(*args, "--resume") == 0
    _assert_same_as_reference(run_dir, fitted_run)


def test_kill_9_between_a_step_checkpoint_and_its_metrics_row_resumes_with_every_row(fitted_run, configs, tmp_path):
    """The save after step 6 (every 2 steps; 5 steps an epoch) is put in place only once step 6's metrics row is
    written: killed in between, the run resumes from the epoch-end save after step 5 and redoes step 6."""
    run_dir = tmp_path / "run"
    killed, args = _run_with("KillAfterStepCheckpoint", {"step": 5}, configs, tmp_path, run_dir)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 5
    assert run_main(*args, "--resume") == 0
    assert not list((run_dir / "checkpoints").glob("*.pending"))
    _assert_same_as_reference(run_dir, fitted_run)


def test_kill_9_at_random_moments_then_resume_ends_where_an_uninterrupted_fit_ends(fitted_run, configs, tmp_path):
    """Two runs killed at random moments of training (a step, a checkpoint or adapter save, validation; the moments
    that matter most have their own tests above and below)."""
    seconds = json.loads((fitted_run / "results.json").read_text())["fit_seconds"]
    rng = random.Random(17)
    for i in range(2):
        run_dir = tmp_path / f"run{i}"
        killed, args = _run_with("KillAfter", {"seconds": rng.uniform(0.0, seconds)}, configs, tmp_path, run_dir)
        if killed.returncode == 0:  # the timer came after the end (a fast machine): nothing to resume
            continue
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert run_main(*args, "--resume") == 0
        _assert_same_as_reference(run_dir, fitted_run)


def test_a_signalled_test_exits_nonzero(fitted_run, configs, tmp_path):
    probe = write_yaml(tmp_path / "probe.yaml", {"trainer": {"callbacks": [
        {"class_path": "probes.SignalAtTestBatch", "init_args": {"signal": int(signal.SIGTERM)}}]}})  # fmt: skip
    cmd = [*monatune_command(), "test", "-c", str(configs.base), "-c", str(configs.mona), "--run_dir", str(fitted_run),
           "-c", str(probe)]  # fmt: skip
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 143, done.stderr[-3000:]
    assert "monatune test: stopped by SIGTERM; nothing was written" in done.stderr
    assert not (fitted_run / "test" / "results.json").exists()


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(fitted_run, configs, tmp_path):
    run_dir = tmp_path / "run"
    killed, args = _run_with("KillAtStep", {"step": 1}, configs, tmp_path, run_dir)
    assert killed.returncode == -signal.SIGKILL and not (run_dir / "checkpoints" / "last.ckpt").exists()
    with pytest.warns(UserWarning, match="stopped before its first checkpoint; training starts from the beginning"):
        assert run_main(*args, "--resume") == 0
    _assert_same_as_reference(run_dir, fitted_run)
