"""The shipped experiment configs compose with every method config and carry the release's recipe."""
import contextlib
import io
from pathlib import Path

import pytest
import yaml

from monatune.cli import main
from monatune.methods import METHODS, resolve_method

ROOT = Path(__file__).resolve().parents[1]
TASKS = sorted((ROOT / "configs" / "cls").glob("*.yaml"))


def resolved(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def test_every_method_has_a_config():
    assert sorted(p.stem for p in (ROOT / "configs" / "methods").glob("*.yaml")) == sorted(METHODS)
    assert [p.stem for p in TASKS] == ["flowers102_swin_l", "pets_swin_l", "voc2007_multilabel_swin_l", "voc2007_swin_l"]


@pytest.mark.parametrize("task", TASKS, ids=lambda p: p.stem)
def test_task_configs_compose_with_every_method(task):
    for method in METHODS:
        config = resolved("-c", str(task), "-c", str(ROOT / "configs" / "methods" / f"{method}.yaml"))
        init = config["model"]["init_args"]
        assert init["method"] == method
        resolve_method(init["method"], init["method_options"])  # a valid method and options
        # the release's recipe (spec section 5)
        assert init["backbone"] == "swin_large_patch4_window7_224"
        assert (init["lr"], init["schedule"], init["warmup_epochs"], init["min_lr_ratio"]) == (3.125e-5, "cosine", 20, 0.01)
        assert config["trainer"]["max_epochs"] == 100 and config["trainer"]["gradient_clip_val"] == 5.0
        assert config["data"]["init_args"]["batch_size"] == 16
        assert (config["data"]["init_args"]["image_size"], config["data"]["init_args"]["resize_size"]) == (224, 256)
        mona_x2 = task.stem.startswith(("flowers102", "pets"))
        assert (init["lr_scale"] or {}).get("mona", 1.0) == (2.0 if mona_x2 else 1.0)


DETECTION = sorted((ROOT / "configs" / "det").glob("*.yaml"))


@pytest.mark.parametrize("task", DETECTION, ids=lambda p: p.stem)
def test_detection_configs_compose_with_every_method(task):
    for method in METHODS:
        config = resolved("-c", str(task), "-c", str(ROOT / "configs" / "methods" / f"{method}.yaml"))
        init, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
        assert config["model"]["class_path"] == "monatune.tasks.ObjectDetector"
        assert init["method"] == method
        resolve_method(init["method"], init["method_options"])
        # the release's recipe: AdamW 1e-4, wd 0.05, step schedule; COCO: 500-iteration warm-up, 16 GPUs x 1 image;
        # VOC: no warm-up, 2 GPUs x 1 image
        coco = task.stem.startswith("coco")
        assert (init["lr"], init["weight_decay"], init["schedule"]) == (1e-4, 0.05, "step")
        assert init["warmup_steps"] == (500 if coco else 0) and data["batch_size"] == 1
        assert data["batch_size"] * trainer["devices"] * trainer["accumulate_grad_batches"] == (16 if coco else 2)
        if coco:
            assert init["backbone"] == "swin_base_patch4_window7_224" and init["drop_path_rate"] == 0.3
            assert (trainer["max_epochs"], init["milestones"], trainer["precision"]) == (36, [27, 33], "16-mixed")
            assert data["train_scales"] == list(range(480, 801, 32)) and (data["max_size"], data["test_scale"]) == (1333, 800)
            assert data["crop"] and data["masks"] and data["format"] == "coco"
        else:
            assert init["backbone"] == "swin_large_patch4_window7_224" and init["detector"] == "retinanet"
            assert (init["drop_path_rate"], init["frozen_stages"], trainer["precision"]) == (0.2, 1, "16-mixed")
            assert (trainer["max_epochs"], data["repeats"], init["milestones"]) == (4, 3, [3])  # 12 epochs, step at 9
            assert (data["train_scales"], data["max_size"], init["metric"]) == ([600], 1000, "voc")
            assert data["splits"][0] == "2007/trainval+2012/trainval" and data["splits"][2] == "2007/test"
    assert [p.stem for p in DETECTION] == [
        "coco_cascade_mask_rcnn_swin_b_3x", "coco_mask_rcnn_swin_b_3x", "voc_retinanet_swin_l"]


def test_segmentation_config_composes_with_every_method():
    task = ROOT / "configs" / "seg" / "ade20k_upernet_swin_l.yaml"
    for method in METHODS:
        config = resolved("-c", str(task), "-c", str(ROOT / "configs" / "methods" / f"{method}.yaml"))
        init, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
        assert config["model"]["class_path"] == "monatune.tasks.SemanticSegmenter" and init["method"] == method
        resolve_method(init["method"], init["method_options"])
        # the release's ADE20K recipe (spec section 5), with its per-method lr and drop-path
        lr = init["lr"] * (init["lr_scale"] or {}).get(method, 1.0)
        drop_path = (init["drop_path_by_method"] or {}).get(method, init["drop_path_rate"])
        assert (lr, drop_path) == pytest.approx((3e-4, 0.2) if method == "mona" else (6e-5, 0.3))
        assert (init["weight_decay"], init["schedule"], init["warmup_steps"], init["min_lr_ratio"]) == (0.01, "poly", 1500, 0.0)
        assert (trainer["max_steps"], init["aux_weight"], init["inference"]) == (160000, 0.4, "whole")
        assert data["batch_size"] * trainer["devices"] * trainer["accumulate_grad_batches"] == 16
        assert (data["crop_size"], data["ratio_range"], data["cat_max_ratio"]) == ([512, 512], [0.5, 2.0], 0.75)


def test_per_method_drop_path_reaches_the_module():
    from monatune.tasks import SemanticSegmenter

    for method, expected in (("mona", 0.2), ("lora", 0.3)):
        module = SemanticSegmenter("swin_tiny_patch4_window7_224", method=method, drop_path_rate=0.3,
                                   drop_path_by_method={"mona": 0.2})  # fmt: skip
        assert module.drop_path_rate == expected


def test_overrides_win_over_config_files():
    task = str(ROOT / "configs" / "cls" / "pets_swin_l.yaml")
    config = resolved("-c", task, "-c", str(ROOT / "configs" / "methods" / "lora.yaml"),
                      "model.init_args.lr=0.5", "--model.init_args.method_options", "{rank: 4}")
    init = config["model"]["init_args"]
    assert (init["method"], init["lr"], init["method_options"]) == ("lora", 0.5, {"rank": 4})
    assert config["data"]["init_args"]["format"] == "pets"


@pytest.mark.parametrize("name", ["det/coco_cascade_mask_rcnn_swin_b_3x", "det/coco_mask_rcnn_swin_b_3x",
                                  "det/voc_retinanet_swin_l", "seg/ade20k_upernet_swin_l"])
def test_dense_paper_configs_test_the_final_adapter_and_sync_batchnorm(name):
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    assert config["adapter_choice"] == "last"  # the release reports its final checkpoint
    assert config["trainer"]["sync_batchnorm"] is True  # the release's SyncBN in the heads
    assert config["model"]["init_args"]["paramwise"]["custom_keys"]["norm"] == 0.0


@pytest.mark.parametrize("task", TASKS, ids=lambda p: p.stem)
def test_classification_paper_configs_test_the_final_adapter(task):
    assert yaml.safe_load(task.read_text())["adapter_choice"] == "last"  # the release keeps only its final checkpoint


def test_adapter_choice_and_sync_batchnorm_resolve_and_override():
    dense = ["-c", str(ROOT / "configs" / "seg" / "ade20k_upernet_swin_l.yaml"),
             "-c", str(ROOT / "configs" / "methods" / "mona.yaml")]  # fmt: skip
    config = resolved(*dense)
    assert (config["adapter_choice"], config["trainer"]["sync_batchnorm"]) == ("last", True)
    assert resolved(*dense, "--adapter_choice", "best")["adapter_choice"] == "best"


OBB = sorted((ROOT / "configs" / "obb").glob("*.yaml"))
FORK_METHOD_OPTIONS = {"mona": {"init": "default"}, "adaptformer": {"init": "default"},
                       "adapter": {"init": "default", "drop_path": "outside"},
                       "lorand": {"branches": 4, "shared_kernel": False, "drop_path": "outside"}}  # fmt: skip


def test_oriented_config_files():
    names = [p.stem for p in OBB]
    assert names == [f"{d}_{k}_swin_b" for d in ("dota", "star") for k in ("h2rbox", "oriented_rcnn", "rotated_retinanet")]
    assert sorted(p.stem for p in (ROOT / "configs" / "obb" / "variants").glob("*.yaml")) == ["retinanet_hbb", "retinanet_kld"]


def oriented_config(task, method, *extra):
    from monatune.engine.module import resolve_options

    config = resolved("-c", str(task), *extra, "-c", str(ROOT / "configs" / "methods" / f"{method}.yaml"))
    init = config["model"]["init_args"]
    assert config["model"]["class_path"] == "monatune.tasks.OrientedDetector" and init["method"] == method
    options = resolve_options(method, init["method_options"], init["method_options_by_method"])
    resolve_method(method, options)
    # the fork's per-method variants reach the method's options
    assert FORK_METHOD_OPTIONS.get(method, {}).items() <= options.items()
    return config


@pytest.mark.parametrize("task", [p for p in OBB if "h2rbox" not in p.stem], ids=lambda p: p.stem)
def test_supervised_oriented_configs_compose_with_every_method(task):
    star, rcnn = task.stem.startswith("star"), "oriented_rcnn" in task.stem
    for method in METHODS:
        config = oriented_config(task, method)
        init, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
        # STAR-MMRotate's Oriented R-CNN / rotated RetinaNet Swin-B recipes (oriented-spec section 5)
        assert init["detector"] == ("oriented_rcnn" if rcnn else "rotated_retinanet")
        assert (init["lr"], init["weight_decay"], init["schedule"], init["milestones"]) == (1e-4, 0.05, "step", [8, 11])
        assert init["paramwise"] == {"custom_keys": {"absolute_pos_embed": 0.0, "relative_position_bias_table": 0.0, "norm": 0.0}}
        assert init["warmup_steps"] == 500 and init["warmup_lr_ratio"] == pytest.approx(1 / 3) and init["drop_path_rate"] == 0.2
        assert (trainer["max_epochs"], trainer["gradient_clip_val"], trainer["check_val_every_n_epoch"]) == (12, 35, 6)
        assert (data["batch_size"], data["horizontal_boxes"], data["flip"]) == (2, False, "three-way")
        assert (init["score_threshold"], init["nms_iou"], init["max_per_image"]) == (0.05, 0.1, 2000)
        assert (init["box_loss"], init["assign_by_circumhbbox"]) == ("l1", False)
        if rcnn:  # train_cfg.rpn_proposal and test_cfg.rpn
            assert (init["nms_pre"], init["max_proposals"]) == (2000, 2000)
        assert (init["test_size"], data.get("full_images")) == ((None, True) if star else (1024, None))
        if star:  # the fork's full-image test: windows of 1024, gap 200; star.py pads to 32
            assert (init["window_size"], init["window_gap"], init["full_image_divisor"], init["window_merge_iou"]) == (1024, 200, 32, 0.4)
            assert (init["window_batch"], init["window_merge_per_class"]) == ((2, True) if rcnn else (4, False))


@pytest.mark.parametrize("variant, assign, loss, flip", [("retinanet_hbb", True, "l1", "horizontal"),
                                                         ("retinanet_kld", True, "kld", "three-way")])  # fmt: skip
def test_retinanet_variants_compose(variant, assign, loss, flip):
    for star in (True, False):
        task = ROOT / "configs" / "obb" / f"{'star' if star else 'dota'}_rotated_retinanet_swin_b.yaml"
        for method in ("mona", "lora"):
            config = oriented_config(task, method, "-c", str(ROOT / "configs" / "obb" / "variants" / f"{variant}.yaml"))
            init, data = config["model"]["init_args"], config["data"]["init_args"]
            assert (init["assign_by_circumhbbox"], init["box_loss"], data["flip"]) == (assign, loss, flip)


@pytest.mark.parametrize("task", [p for p in OBB if "h2rbox" in p.stem], ids=lambda p: p.stem)
def test_h2rbox_configs_compose_with_every_method(task):
    star = task.stem.startswith("star")
    for method in METHODS:
        config = oriented_config(task, method)
        init, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
        # STAR-MMRotate's H2RBox-v2+ PEFT recipe (oriented-spec section 1)
        assert (init["lr"], init["weight_decay"], init["paramwise"]) == ((1e-4 if star else 5e-5), 0.05, {})
        assert (init["schedule"], init["milestones"], init["warmup_steps"]) == ("step", [8, 11], 500)
        assert init["warmup_lr_ratio"] == pytest.approx(1 / 3) and init["drop_path_rate"] == 0.2
        assert (trainer["max_epochs"], trainer["gradient_clip_val"], trainer["check_val_every_n_epoch"]) == (12, 35, 6)
        assert data["batch_size"] == 2 and data["horizontal_boxes"] is True
        assert init["square_classes"] == (["tank", "roundabout"] if star else ["baseball-diamond", "storage-tank", "roundabout"])
        assert init["resize_classes"] == ([] if star else ["baseball-diamond"]) or (star and init["resize_classes"] is None)
        assert (init["test_size"], data.get("full_images")) == ((None, True) if star else (1024, None))
