"""A fit killed mid-epoch and resumed ends exactly where an uninterrupted fit ends; run-directory guards."""
import csv
import json
import shutil
import signal
import subprocess

import torch
from engine_helpers import (
    EPOCHS, REFERENCE_ARGS, TRAIN_BATCHES, monatune_command, run_main, snapshot, subprocess_env, write_yaml,
)  # fmt: skip
from safetensors.torch import load_file

KILL_STEP = 7  # second epoch, third batch; the last checkpoint before it is step 6 (every 2 steps)


def train_losses(run_dir) -> dict[int, str]:
    """step -> train/loss as written in metrics.csv (a resumed run's later rows win)."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r["train/loss"]}


def test_killed_fit_resumes_bit_identical(fitted_run, configs, tmp_path):
    run_dir = tmp_path / "run"
    kill = write_yaml(
        tmp_path / "kill.yaml",
        {"trainer": {"callbacks": [{"class_path": "probes.KillAtStep", "init_args": {"step": KILL_STEP}}]}},
    )
    args = ["fit", "-c", configs.base, "-c", configs.mona, "--run_dir", run_dir, *REFERENCE_ARGS]  # as fitted_run
    cmd = [*monatune_command(), *map(str, args), "-c", str(kill)]
    killed = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run_dir / "results.json").exists()
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (state["epoch"], state["global_step"]) == (1, 6)  # mid-epoch: 1 of its 5 batches done
    assert state["monatune"]["frozen_omitted"] > 0  # slim: the frozen backbone is not in it

    assert run_main(*args, "--resume") == 0

    ref = load_file(fitted_run / "adapter-last" / "adapter_model.safetensors")
    got = load_file(run_dir / "adapter-last" / "adapter_model.safetensors")
    assert sorted(got) == sorted(ref)
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, f"{len(different)} of {len(ref)} tensors differ, first {different[:3]}"
    ref_results = json.loads((fitted_run / "results.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == ref_results["steps"] == EPOCHS * TRAIN_BATCHES
    assert (results["epochs"], results["best"], results["last"]) == (EPOCHS, ref_results["best"], ref_results["last"])
    # every step after the restart computed the same loss as the uninterrupted run
    resumed = train_losses(run_dir)
    assert set(resumed) == set(range(EPOCHS * TRAIN_BATCHES))
    assert resumed == train_losses(fitted_run)


def test_fit_into_a_finished_run_is_refused_and_changes_nothing(fitted_run, configs, tmp_path, capsys):
    run_dir = shutil.copytree(fitted_run, tmp_path / "run")
    before = snapshot(run_dir)
    assert run_main("fit", "-c", configs.base, "-c", configs.mona, "--run_dir", run_dir) == 2
    err = capsys.readouterr().err
    assert f"monatune fit: error: '{run_dir}' already holds a run; add --resume" in err
    assert snapshot(run_dir) == before


def test_resume_without_a_checkpoint_is_an_error(configs, in_tmp, capsys):
    run_dir = in_tmp / "never-started"
    assert run_main("fit", "-c", configs.base, "--run_dir", run_dir, "--resume") == 2
    err = capsys.readouterr().err
    assert f"cannot resume: '{run_dir / 'checkpoints' / 'last.ckpt'}' does not exist" in err
    assert list(in_tmp.iterdir()) == []
