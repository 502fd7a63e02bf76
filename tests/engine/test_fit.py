"""A fit on tiny colour data learns and leaves a complete run directory; test and predict reuse it."""
import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from engine_helpers import (
    BACKBONE, COLORS, EPOCHS, MONA_OPTIONS, SPLIT_SIZES, TRAIN_BATCHES, build_tuned, run_main,
)  # fmt: skip
from PIL import Image

import monatune
from monatune.data import ClassificationData
from monatune.data.classification_data import IMAGENET_MEAN, IMAGENET_STD, classification_transforms

DROP_PATH = 0.2  # the reference run's override


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def trained_model(adapter: Path) -> torch.nn.Module:
    model = build_tuned(drop_path_rate=DROP_PATH)
    monatune.load_adapter(model, adapter)  # also checks the frozen base is the fit's (same seed)
    return model.eval()


def test_fit_learns(fitted_run):
    rows = metric_rows(fitted_run)
    losses = [(int(r["step"]), float(r["train/loss"])) for r in rows if r["train/loss"]]
    assert [step for step, _ in losses] == list(range(EPOCHS * TRAIN_BATCHES))  # log_every_n_steps 1
    assert losses[-1][1] < 0.5 * losses[0][1]
    accuracies = [float(r["val/acc"]) for r in rows if r["val/acc"]]
    assert len(accuracies) == EPOCHS
    results = read_json(fitted_run / "results.json")
    assert results["monitor"] == "val/acc"
    assert results["best"] == pytest.approx(max(accuracies)) and results["best"] >= 0.8  # chance is 1/3
    assert results["last"] == pytest.approx(accuracies[-1])
    best = read_json(fitted_run / "adapter-best" / "adapter_config.json")["metadata"]
    assert best["val/acc"] == pytest.approx(results["best"]) and best["epoch"] == results["best_epoch"]


def test_results_json(fitted_run):
    results = read_json(fitted_run / "results.json")
    assert (results["method"], results["method_options"], results["backbone"]) == ("mona", MONA_OPTIONS, BACKBONE)
    report = monatune.count_parameters(build_tuned(drop_path_rate=DROP_PATH))
    assert results["parameters"] == {
        "total": report.total,
        "trainable": report.trainable,
        "adapter": report.adapter,
        "head": report.head,
        "trainable_percent": round(report.trainable_percent, 4),
        "task_head": 0,  # classification: the head is part of the tuned network
    }
    assert 0 < report.adapter < report.trainable < report.total
    assert results["peak_memory_bytes"] > 0 and results["peak_memory_kind"] == "peak_rss"
    assert results["seconds_per_iteration"] > 0 and results["images_per_second"] > 0
    assert (results["epochs"], results["steps"]) == (EPOCHS, EPOCHS * TRAIN_BATCHES)
    assert (results["devices"], results["skipped_images"]) == (1, 0)


def test_config_yaml_is_the_composed_config(fitted_run, color_data):
    config = yaml.safe_load((fitted_run / "config.yaml").read_text())
    init = config["model"]["init_args"]
    assert (init["method"], init["method_options"]) == ("mona", MONA_OPTIONS)  # the method file
    assert init["drop_path_rate"] == DROP_PATH  # the model.init_args.drop_path_rate=0.2 override
    assert (init["backbone"], init["lr"], init["warmup_epochs"]) == (BACKBONE, 0.003, 1)  # the base file
    assert config["data"]["init_args"]["root"] == str(color_data)
    assert (config["run_dir"], config["save_every_n_steps"]) == (str(fitted_run), 2)
    assert config["trainer"]["log_every_n_steps"] == 1


def test_curves_and_tensorboard(fitted_run):
    png = fitted_run / "curves.png"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
    events = list((fitted_run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    content = events[0].read_bytes()
    assert b"train/loss" in content and b"val/acc" in content


def test_adapter_best_reproduces_monatune_test(fitted_run, color_data):
    assert run_main("test", "-c", fitted_run / "config.yaml") == 0  # the fit's own resolved config
    tested = read_json(fitted_run / "test" / "results.json")
    assert set(tested["metrics"]) == {"test/acc", "test/loss"}
    assert tested["parameters"] == read_json(fitted_run / "results.json")["parameters"]

    model = trained_model(fitted_run / "adapter-best")
    data = ClassificationData(str(color_data), batch_size=8, num_workers=0, image_size=32, resize_size=36)
    correct = 0
    with torch.no_grad():
        for batch in data.test_dataloader():
            correct += int((model(batch["image"]).argmax(-1) == batch["target"]).sum())
    assert len(data.test_set) == SPLIT_SIZES["test"] * len(COLORS)
    assert tested["metrics"]["test/acc"] == pytest.approx(correct / len(data.test_set))


def test_predict_writes_rows_and_pictures(fitted_run, color_data):
    folder = color_data / "test"
    assert run_main("predict", "-c", fitted_run / "config.yaml", "--data.init_args.predict_path", folder) == 0
    out = fitted_run / "predict"
    rows = read_json(out / "predictions.json")
    paths = [row["path"] for row in rows]
    assert paths == sorted(str(p) for p in folder.rglob("*.jpg"))  # one row per image, sorted
    names = list(COLORS)
    for row in rows:
        top = row["top"]
        assert [t["name"] for t in top] == [names[t["label"]] for t in top]
        assert sorted(t["label"] for t in top) == [0, 1, 2]  # top_k 5 over 3 classes: all of them
        assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    pictures = sorted((out / "pictures").glob("*.png"))
    assert len(pictures) == len(rows)
    with Image.open(pictures[0]) as im:
        assert im.format == "PNG" and im.height > 32

    # the scores are the adapter-best model's probabilities, image by image
    transform = classification_transforms(False, 32, 36, IMAGENET_MEAN, IMAGENET_STD)
    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(transform(im.convert("RGB")))
    with torch.no_grad():
        probs = trained_model(fitted_run / "adapter-best")(torch.stack(images)).softmax(-1)
    got = torch.tensor([[t["score"] for t in sorted(row["top"], key=lambda t: t["label"])] for row in rows])
    torch.testing.assert_close(got, probs, atol=2e-6, rtol=0)


def test_adapter_choice_last_tests_the_final_epoch(fitted_run, tmp_path):
    """The paper configs test adapter-last (the release reports its final checkpoint); best stays the default."""
    assert run_main("validate", "-c", fitted_run / "config.yaml", "--adapter_choice", "last") == 0
    resolved = yaml.safe_load((fitted_run / "validate" / "config.yaml").read_text())
    assert resolved["model"]["init_args"]["adapter"] == str(fitted_run / "adapter-last")
    assert read_json(fitted_run / "validate" / "results.json")["adapter_dir"] == str(fitted_run / "adapter-last")
    assert run_main("validate", "-c", fitted_run / "config.yaml") == 0
    resolved = yaml.safe_load((fitted_run / "validate" / "config.yaml").read_text())
    assert resolved["model"]["init_args"]["adapter"] == str(fitted_run / "adapter-best")
    assert read_json(fitted_run / "validate" / "results.json")["adapter_dir"] == str(fitted_run / "adapter-best")
    last = read_json(fitted_run / "adapter-last" / "adapter_config.json")["metadata"]
    assert last["epoch"] == EPOCHS - 1
