"""``monatune fit | test | predict`` on generated DOTA (split patches) and STAR (whole scenes) folders."""
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from oriented_data import write_oriented_folder
from PIL import Image

from monatune.data import DOTA_CLASSES
from run_cli import run_main as run

ROOT = Path(__file__).resolve().parents[2]
SWIN = {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "window_size": 4}
TINY = ["--model.init_args.pretrained", "null", "--model.init_args.model_kwargs", json.dumps(SWIN),
        "--model.init_args.fpn_channels", "64", "--model.init_args.lr", "1e-3", "--trainer.max_epochs", "1",
        "--trainer.accelerator", "cpu", "--trainer.check_val_every_n_epoch", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.init_args.warmup_steps", "1", "--model.init_args.score_threshold", "0.0",
        "--model.init_args.nms_pre", "100", "--model.init_args.max_per_image", "50",
        "--data.init_args.num_workers", "0", "--data.init_args.size", "96"]  # fmt: skip
# the DOTA configs evaluate at a long side of 1024 (the release's); the tests' 64-pixel patches need no more than 96
DOTA_TEST_SIZE = ["--model.init_args.test_size", "96"]


def config(name):
    return ["-c", str(ROOT / "configs" / "obb" / name)]


def method(name):
    return ["-c", str(ROOT / "configs" / "methods" / f"{name}.yaml")]


def read_json(path):
    return json.loads(Path(path).read_text())


def test_dota_fit_test_submission_and_predict(tmp_path):
    classes = ("plane", "ship", "harbor")
    root = tmp_path / "split_ss_dota"
    write_oriented_folder(root / "trainval", 4, classes=classes, names=[f"P{i}__1024__0___0" for i in range(4)])
    # test patches: two patches of one image, cut at x 0 and 40, plus another image; no annotations
    write_oriented_folder(root / "test", 3, classes=classes, layout=None, seed=3,
                          names=["P7__1024__0___0", "P7__1024__40___0", "P8__1024__0___0"])  # fmt: skip
    write_oriented_folder(tmp_path / "orig", 2, classes=classes, layout="labelTxt", names=["P7", "P8"], header=True)
    args = [*config("dota_h2rbox_swin_b.yaml"), *method("mona"), "--data.init_args.root", str(root), *TINY,
            *DOTA_TEST_SIZE]  # fmt: skip
    run_dir = tmp_path / "run"
    assert run("fit", *args, "--run_dir", run_dir) == 0
    results = read_json(run_dir / "results.json")
    assert results["monitor"] == "val/rmap50" and 0.0 <= results["last"] <= 1.0 and results["steps"] == 2
    assert (run_dir / "adapter-last" / "task_head.safetensors").is_file()

    assert run("test", *args, "--run_dir", run_dir, "--model.init_args.devkit_labels", tmp_path / "orig" / "labelTxt") == 0
    metrics = read_json(run_dir / "test" / "results.json")["metrics"]
    assert set(metrics) == {"test/devkit_map50"} and 0.0 <= metrics["test/devkit_map50"] <= 1.0
    task1 = run_dir / "test" / "Task1"
    with zipfile.ZipFile(task1 / "Task1.zip") as zf:
        assert len(zf.namelist()) == 15 and "Task1_plane.txt" in zf.namelist()
    ids = {line.split()[0] for f in task1.glob("Task1_*.txt") for line in f.read_text().splitlines()}
    assert ids <= {"P7", "P8"} and ids  # patches merged into their images
    for f in task1.glob("Task1_*.txt"):
        for line in f.read_text().splitlines():
            assert len(line.split()) == 10

    assert run("predict", *args, "--run_dir", run_dir, "--data.init_args.predict_path", root / "test" / "images",
               "--model.init_args.predict_threshold", "0.0") == 0  # fmt: skip
    rows = read_json(run_dir / "predict" / "predictions.json")
    assert len(rows) == 3 and sum(len(r["boxes"]) for r in rows) > 0
    for row in rows:
        assert len(row["boxes"]) == len(row["polygons"]) == len(row["labels"]) == len(row["names"]) == len(row["scores"])
        assert all(len(b) == 5 for b in row["boxes"]) and all(len(p) == 8 for p in row["polygons"])
        assert set(row["names"]) <= set(DOTA_CLASSES) and row["scores"] == sorted(row["scores"], reverse=True)
    pictures = sorted((run_dir / "predict" / "pictures").glob("*.png"))
    assert len(pictures) == 3
    drawn = np.asarray(Image.open(pictures[0]).convert("RGB"), dtype=int)
    original = np.asarray(Image.open(rows[0]["path"]).convert("RGB"), dtype=int)
    assert drawn.shape == original.shape and (not rows[0]["boxes"] or np.abs(drawn - original).max() > 60)


def test_star_fit_and_whole_scene_test(tmp_path, capsys):
    classes = ("ship", "tank", "roundabout")
    root = tmp_path / "STAR"
    write_oriented_folder(root / "train", 4, classes=classes)
    write_oriented_folder(root / "test", 2, size=(230, 150), classes=classes, seed=5)  # several 96 windows each
    args = [*config("star_h2rbox_swin_b.yaml"), *method("lora"), "--data.init_args.root", str(root), *TINY,
            "--model.init_args.window_size", "96", "--model.init_args.window_gap", "24", "--model.init_args.window_batch", "3",
            "--data.init_args.classes", json.dumps(classes)]  # three of STAR's classes: fewer candidates to merge
    run_dir = tmp_path / "run"
    assert run("fit", *args, "--run_dir", run_dir) == 0
    results = read_json(run_dir / "results.json")
    assert results["method"] == "lora" and 0.0 <= results["last"] <= 1.0
    assert run("test", *args, "--run_dir", run_dir) == 0
    metrics = read_json(run_dir / "test" / "results.json")["metrics"]
    assert set(metrics) == {"test/rmap50"} and metrics["test/rmap50"] == pytest.approx(results["last"], abs=1e-6)
    assert not (run_dir / "test" / "Task1").exists()  # no server files for STAR

    # a whole scene damaged after its header (the task reads it window by window): skipped with on_bad_image=skip,
    # counted and named as the loader's skips are; otherwise the run stops naming it
    bad = sorted((root / "test" / "images").glob("*.png"))[1]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    assert run("test", *args, "--run_dir", run_dir, "--data.init_args.on_bad_image", "skip") == 0
    tested = read_json(run_dir / "test" / "results.json")
    assert (tested["skipped_images"], tested["skipped_files"]) == (1, [str(bad)])
    assert 0.0 <= tested["metrics"]["test/rmap50"] <= 1.0
    capsys.readouterr()
    assert run("test", *args, "--run_dir", run_dir) != 0
    err = capsys.readouterr().err
    assert str(bad) in err and "on_bad_image=skip" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("obb")
    for split in ("trainval", "test"):
        write_oriented_folder(base / "dota" / split, 2, size=(64, 64), classes=("plane", "ship"))
    for split in ("train", "test"):
        write_oriented_folder(base / "star" / split, 2, size=(64, 64), classes=("ship", "tank"))
    return base


METHOD_NAMES = sorted(p.stem for p in (ROOT / "configs" / "methods").glob("*.yaml"))
# every method trains with every detector; the data set and RetinaNet's variant rotate with the method, so each
# config (and variant) also meets several methods; the first method of each config also tests and predicts
RETINANET_TURNS = [("dota", None), ("star", "retinanet_kld"), ("star", "retinanet_hbb"), ("dota", "retinanet_kld"),
                   ("star", None), ("dota", "retinanet_hbb")]  # fmt: skip
RUNS = []
for i, name in enumerate(METHOD_NAMES):
    folder, other = ("dota", "star") if i % 2 == 0 else ("star", "dota")
    RUNS.append(("h2rbox", folder, None, name))
    RUNS.append(("oriented_rcnn", other, None, name))
    RUNS.append(("rotated_retinanet", *RETINANET_TURNS[i % len(RETINANET_TURNS)], name))
FIRST = {}
for run_ in RUNS:
    FIRST.setdefault(run_[:3], run_)


@pytest.mark.parametrize("detector, folder, variant, name", RUNS, ids=lambda v: str(v))
def test_every_config_trains_with_every_method(small_sets, tmp_path, detector, folder, variant, name):
    # one step and a validation (STAR: whole test scenes in windows) through the CLI, the config composed with the method's
    extra = config(f"variants/{variant}.yaml") if variant else []
    args = [*config(f"{'dota' if folder == 'dota' else 'star'}_{detector}_swin_b.yaml"), *extra, *method(name),
            "--data.init_args.root", str(small_sets / folder), *TINY, "--trainer.max_steps", "1"]  # fmt: skip
    if folder == "dota":
        args += DOTA_TEST_SIZE
    if detector == "oriented_rcnn":  # an untrained RPN's 2000 proposals make the rotated NMS most of the run
        args += ["--model.init_args.max_proposals", "64"]
    if folder == "star":  # windows smaller than the scenes; for H2RBox the config's square classes
        args += ["--model.init_args.window_size", "64", "--model.init_args.window_gap", "16"]
        if detector == "h2rbox":
            args += ["--data.init_args.classes", json.dumps(["ship", "tank", "roundabout"])]
    run_dir = tmp_path / "run"
    assert run("fit", *args, "--run_dir", run_dir) == 0
    results = read_json(run_dir / "results.json")
    assert results["method"] == name and results["steps"] == 1 and 0.0 <= results["last"] <= 1.0
    if FIRST[(detector, folder, variant)] != (detector, folder, variant, name):
        return
    assert run("test", *args, "--run_dir", run_dir) == 0
    metrics = read_json(run_dir / "test" / "results.json")["metrics"]
    assert 0.0 <= metrics["test/rmap50"] <= 1.0
    if folder == "star":  # the STAR configs validate on the test split
        assert metrics["test/rmap50"] == pytest.approx(results["last"], abs=1e-6)
    assert run("predict", *args, "--run_dir", run_dir, "--model.init_args.predict_threshold", "0.0") == 0
    rows = read_json(run_dir / "predict" / "predictions.json")
    assert len(rows) == 2 and all(len(r["boxes"]) == len(r["polygons"]) == len(r["scores"]) for r in rows)


def test_oriented_rcnn_takes_its_rpn_sizes_from_the_task():
    from monatune.tasks import OrientedDetector

    task = OrientedDetector("swin_tiny_patch4_window7_224", detector="oriented_rcnn", num_classes=2, pretrained=None,
                            model_kwargs=SWIN, fpn_channels=16, nms_pre=300, max_proposals=40)  # fmt: skip
    rpn = task.build_network().rpn
    assert (rpn.pre_nms_top_n(), rpn.post_nms_top_n()) == (300, 40)
    with pytest.raises(ValueError, match="max_proposals is an option of oriented_rcnn"):
        OrientedDetector("swin_tiny_patch4_window7_224", detector="h2rbox_v2p", num_classes=2, max_proposals=40)
