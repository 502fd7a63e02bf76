"""``monatune bench`` on a tiny Swin: the report's files, rows, ratios and errors (times are measured, not asserted)."""
import contextlib
import io
import json
import statistics
import subprocess

import pytest
from run_cli import run_main
from tiny_models import TINY_SWIN

from monatune import bench

BACKBONE = "swin_tiny_patch4_window7_224"
TINY = ["--backbone", BACKBONE, "--model-kwargs", json.dumps(TINY_SWIN), "--num-classes", 5, "--input-size", 32]
FAST = ["--batch-size", 2, "--steps", 2, "--warmup", 1, "--threads", 1, "--quiet"]
METHODS = ["full", "mona", "mona-release", "fixed"]


def run_captured(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_main("bench", *argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One real run: four methods, each in its own worker process."""
    out_dir = tmp_path_factory.mktemp("bench") / "results"
    code, stdout, stderr = run_captured(*TINY, *FAST, "--methods", ",".join(METHODS), "--output", out_dir)
    assert code == 0, stderr
    return out_dir, stdout


def test_writes_json_and_markdown(cli_run):
    out_dir, stdout = cli_run
    report = json.loads((out_dir / "bench.json").read_text())
    markdown = (out_dir / "bench.md").read_text()
    assert markdown.rstrip("\n") == stdout.rstrip("\n")  # the same table as printed
    for method in METHODS:
        assert any(line.startswith(f"| {method} |") for line in markdown.splitlines())
    assert report["config"]["input_size"] == [32, 32] and report["config"]["device"] == "cpu"
    assert report["env"]["threads"] == 1 and report["env"]["torch"]
    assert report["command"].startswith("monatune bench --backbone swin_tiny_patch4_window7_224 --methods full,mona")
    assert f"`{report['command']}`" in markdown


def test_rows_have_positive_figures(cli_run):
    report = json.loads((cli_run[0] / "bench.json").read_text())
    assert [r["method"] for r in report["rows"]] == METHODS
    for row in report["rows"]:
        (raw,) = row["rounds"]
        assert len(raw["train_times_s"]) == 2 and len(raw["inference_times_s"]) == 2
        m = row["medians"]
        for key in ("train_step_s", "inference_s", "peak_mem_mib", "model_mem_mib", "train_images_per_s"):
            assert m[key] > 0, (row["method"], key)
        assert m["peak_mem_mib"] >= m["model_mem_mib"]
        assert m["train_images_per_s"] == pytest.approx(2 / m["train_step_s"])
        assert m["train_step_s"] == statistics.median(raw["train_times_s"])
        assert not raw["checkpointing"] and raw["frozen_precision"] is None


def test_ratios_are_against_full(cli_run):
    rows = {r["method"]: r for r in json.loads((cli_run[0] / "bench.json").read_text())["rows"]}
    full = rows["full"]
    # A tiny model's training may not lift the process's peak RSS above its import-time peak:
    # then full's training part is 0 and that ratio is undefined (None), not a division by zero.
    step_mem = 1.0 if full["medians"]["step_mem_mib"] > 0 else None
    assert full["ratios"] == {"train_step": 1.0, "inference": 1.0, "peak_mem": 1.0, "step_mem": step_mem}
    for method in ("mona", "mona-release", "fixed"):
        ratios, medians = rows[method]["ratios"], rows[method]["medians"]
        assert ratios["train_step"] == pytest.approx(medians["train_step_s"] / full["medians"]["train_step_s"])
        assert ratios["inference"] == pytest.approx(medians["inference_s"] / full["medians"]["inference_s"])
        assert ratios["peak_mem"] == pytest.approx(medians["peak_mem_mib"] / full["medians"]["peak_mem_mib"])


def test_trainable_share(cli_run):
    rows = {r["method"]: r for r in json.loads((cli_run[0] / "bench.json").read_text())["rows"]}
    assert rows["full"]["trainable_percent"] == 100.0
    assert rows["fixed"]["trainable_percent"] < rows["mona"]["trainable_percent"] < 100.0
    assert rows["mona"]["trainable"] == rows["mona-release"]["trainable"]  # the same module, another implementation
    assert rows["mona"]["total"] > rows["full"]["total"] == rows["fixed"]["total"]


def test_rounds_keep_every_raw_figure(monkeypatch):
    """Two rounds: two worker outputs per method, in alternating order; each figure the median over rounds."""
    calls = []

    def worker_in_process(spec, label):  # the worker's code, without the fresh process
        calls.append(spec["method"])
        return bench._worker(spec)

    monkeypatch.setattr(bench, "_run_worker", worker_in_process)
    settings = dict(batch_size=2, input_size=32, device="cpu", steps=2, warmup=1, num_classes=5, model_kwargs=TINY_SWIN)
    result = bench.run_bench(BACKBONE, ["full", "fixed"], rounds=2, **settings)  # no threads=: ours stay as they are
    assert calls == ["full", "fixed", "full", "fixed"]
    for row in result.rows:
        assert len(row.rounds) == 2
        assert row.medians["train_step_s"] == statistics.median(r["train_step_s"] for r in row.rounds)
    fixed, full = result.row("fixed"), result.row("full")
    assert fixed.ratios["train_step"] == pytest.approx(fixed.medians["train_step_s"] / full.medians["train_step_s"])
    assert len(json.loads(result.to_json())["rows"][0]["rounds"]) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "full,monaa"], "unknown bench method(s) ['monaa']; choose from full, fixed"),
        (["--backbone", "swin_tiny_patch4_window7_22"], "unknown timm backbone 'swin_tiny_patch4_window7_22'"),
        (["--model-kwargs", "{depths: 1}"], "--model-kwargs is not valid JSON"),
        (["--model-kwargs", '{"depthz": 1}'], "unexpected keyword argument 'depthz'"),
        (["--input-size", "32x"], "--input-size is a side or HxW"),
        (["--methods", "full,fixed", "--method-option", "bottleneck=8"], "no method in ['full', 'fixed'] takes"),
    ],
)
def test_user_errors_exit_2_before_any_worker(argv, message, monkeypatch):
    monkeypatch.setattr(bench, "_run_worker", lambda spec, label: pytest.fail("a worker started"))
    code, stdout, stderr = run_captured(*TINY, *FAST, *argv)
    assert code == 2 and stdout == ""
    assert stderr.startswith("monatune bench: error: ") and message in stderr


def test_cuda_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, _, stderr = run_captured(*TINY, *FAST, "--device", "cuda")
    assert code == 2 and "torch sees no CUDA device" in stderr


def test_crashed_worker_shows_its_stderr(monkeypatch):
    def crashed(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Traceback ...\nRuntimeError: out of memory\n")

    monkeypatch.setattr(bench.subprocess, "run", crashed)
    code, stdout, stderr = run_captured(*TINY, *FAST, "--methods", "mona")
    assert code == 2 and stdout == ""
    assert stderr.startswith("monatune bench: error: the worker for 'mona' (round 1 of 1) exited with code 1")
    assert "RuntimeError: out of memory" in stderr


def test_memory_options_apply_to_all_but_full(monkeypatch, tmp_path):
    memory = pytest.importorskip("monatune.memory")
    if not all(hasattr(memory, f) for f in ("set_activation_checkpointing", "set_frozen_precision")):
        pytest.skip("monatune.memory lacks set_activation_checkpointing / set_frozen_precision")
    monkeypatch.setattr(bench, "_run_worker", lambda spec, label: bench._worker(spec))  # no fresh process: fast
    # (run_main restores torch's thread count, which the in-process worker sets to --threads 1)
    argv = ["--methods", "full,mona", "--checkpointing", "--frozen-precision", "bf16", "--output", tmp_path]
    code, _, stderr = run_captured(*TINY, *FAST, *argv)
    assert code == 0, stderr
    rows = {r["method"]: r["rounds"][0] for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert (rows["mona"]["checkpointing"], rows["mona"]["frozen_precision"]) == (True, "bf16")
    assert (rows["full"]["checkpointing"], rows["full"]["frozen_precision"]) == (False, None)
    markdown = (tmp_path / "bench.md").read_text()
    assert "| checkpointing, frozen bf16 |" in markdown and "| off |" in markdown
