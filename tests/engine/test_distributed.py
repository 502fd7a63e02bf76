"""Two processes (DDP over gloo on the CPU) train one model and score the validation set once."""
import json
import subprocess

import pytest
from engine_helpers import COLORS, SPLIT_SIZES, build_tuned, monatune_command, run_main, subprocess_env, write_yaml
from probes import trainable_digest

import monatune

VAL_SIZE = SPLIT_SIZES["val"] * len(COLORS)  # 15: odd, so the two processes get different shares


def test_two_processes_agree_with_one_process_evaluation(configs, tmp_path):
    run_dir, reports = tmp_path / "run", tmp_path / "ranks"
    probe = write_yaml(
        tmp_path / "probe.yaml",
        {"trainer": {"callbacks": [{"class_path": "probes.RankReport", "init_args": {"out_dir": str(reports)}}]}},
    )
    cmd = [
        *monatune_command(), "fit", "-c", str(configs.base), "-c", str(configs.mona), "-c", str(probe),
        "--run_dir", str(run_dir), "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
        "--model.init_args.lr", "3e-4",  # one short epoch: accuracy between 0 and 1, so agreeing means something
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # one model
    counts = [r["val_images"] for r in ranks]
    assert sum(counts) == VAL_SIZE and sorted(counts) == [VAL_SIZE // 2, VAL_SIZE // 2 + 1]  # each image once
    assert ranks[0]["val_acc"] == ranks[1]["val_acc"] and ranks[0]["val_loss"] == ranks[1]["val_loss"]
    accuracy = ranks[0]["val_acc"]
    assert 0 < accuracy < 1

    results = json.loads((run_dir / "results.json").read_text())
    assert results["devices"] == 2
    assert results["steps"] == 3  # 36 training images: 18 per process, 3 batches of 8
    assert results["last"] == pytest.approx(accuracy)

    # adapter-last holds the weights both processes ended with
    model = build_tuned()
    monatune.load_adapter(model, run_dir / "adapter-last")
    assert trainable_digest(model) == ranks[0]["digest"]
    # and one process scoring the whole validation set with it finds what the two found together
    last = run_dir / "adapter-last"
    assert run_main("validate", "-c", configs.base, "-c", configs.mona, "--run_dir", run_dir,
                    "--model.init_args.adapter", last) == 0  # fmt: skip
    metrics = json.loads((run_dir / "validate" / "results.json").read_text())["metrics"]
    assert metrics["val/acc"] == pytest.approx(accuracy, abs=1e-6)
    assert round(accuracy * VAL_SIZE, 4) == round(accuracy * VAL_SIZE)  # a share of the 15 images
    assert metrics["val/loss"] == pytest.approx(ranks[0]["val_loss"], rel=1e-5)
