"""DetectionData: the detection data module over tiny generated COCO and VOC folders."""
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from shapes_detection import CLASSES, make_images, write_coco, write_voc

import monatune.data.detection_data as detection_data
import monatune.data.loading as loading
from monatune.data import BadAnnotationError, DetectionData
from monatune.data.detection_data import parse_voc_split
from monatune.data.loading import ResumableLoader

N_TRAIN, N_VAL, N_TEST = 6, 5, 4
W, H = 128, 96  # the generator's image size
SMALL = dict(num_workers=0, batch_size=2, train_scales=[64], max_size=96, test_scale=64)
COCO_SPLITS = ("train", "val", "val")
VOC_SPLITS = ("2007/trainval", "2007/test", "2007/test")


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    """A COCO set shared by the tests that only read it."""
    return write_coco(tmp_path_factory.mktemp("coco"), n_train=N_TRAIN, n_val=N_VAL)


@pytest.fixture
def own_coco(tmp_path) -> Path:
    """A COCO set a test may edit."""
    return write_coco(tmp_path / "coco", n_train=N_TRAIN, n_val=N_VAL)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return write_voc(tmp_path_factory.mktemp("voc"), n_train=N_TRAIN, n_test=N_TEST)


def coco_data(root: Path, **kw) -> DetectionData:
    return DetectionData(str(root), **{"splits": COCO_SPLITS, **SMALL, **kw})


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def epoch(loader) -> list[dict]:
    return list(loader)


# --- COCO ----------------------------------------------------------------------------------------


def test_coco_properties(coco_root):
    dm = coco_data(coco_root)
    assert dm.classes == list(CLASSES) and dm.num_classes == 3
    assert dm.eval_size == (64, 96) and dm.metric == "coco"
    assert DetectionData.resizes_training_images is True and dm.resizes_training_images is True
    assert len(dm.train_set) == N_TRAIN and len(dm.val_set) == N_VAL
    assert dm.test_set is dm.val_set  # same split name: one data set, read once


def test_coco_train_batches_are_resized_and_consistent(coco_root):
    dm = coco_data(coco_root)
    batches = epoch(dm.train_dataloader())
    assert len(batches) == math.ceil(N_TRAIN / 2)
    paths = []
    for batch in batches:
        assert set(batch) == {"images", "targets", "paths", "skipped"} and batch["skipped"] == []
        assert len(batch["images"]) == len(batch["targets"]) == len(batch["paths"])
        for image, target in zip(batch["images"], batch["targets"]):
            assert image.dtype == torch.float32 and image.shape[0] == 3
            assert 0 <= image.min() and image.max() <= 1 and image.max() > 0.5  # scaled, not uint8 values
            h, w = image.shape[-2:]
            assert abs(min(h, w) - 64) <= 1 and max(h, w) <= 96
            boxes, labels = target["boxes"], target["labels"]
            assert len(boxes) == len(labels) > 0 and "path" not in target
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
            assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert ((labels >= 1) & (labels <= 3)).all()
            assert target["masks"].shape == (len(boxes), h, w)
        paths += batch["paths"]
    assert sorted(paths) == sorted(dm.train_set.path(i) for i in range(N_TRAIN))  # one epoch: every image once


def test_coco_val_keeps_original_size_and_json_boxes(coco_root):
    dm = coco_data(coco_root)
    data = json.loads((coco_root / "annotations" / "instances_val.json").read_text())
    expected = {im["file_name"]: [] for im in data["images"]}
    name_of = {im["id"]: im["file_name"] for im in data["images"]}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        expected[name_of[ann["image_id"]]].append([x, y, x + w, y + h])
    seen = []
    for batch in dm.val_dataloader():
        for image, target, path in zip(batch["images"], batch["targets"], batch["paths"]):
            assert image.dtype == torch.float32 and tuple(image.shape) == (3, H, W)  # the detector resizes
            name = Path(path).name
            assert torch.allclose(target["boxes"].as_subclass(torch.Tensor), torch.tensor(expected[name]), atol=1e-4)
            assert target["masks"].shape[-2:] == (H, W)
            seen.append(name)
    assert sorted(seen) == sorted(expected)


def test_test_split_of_another_name_is_read_when_needed(own_coco):
    dm = coco_data(own_coco, splits=("train", "val", "nope"))  # no 'nope' folder: construction still works
    with pytest.raises(FileNotFoundError, match="nope"):
        dm.test_dataloader()
    dm = coco_data(own_coco, splits=("train", "val", "train"))
    assert dm.test_set is not dm.val_set and len(dm.test_set) == N_TRAIN


def test_annotations_override_json_paths(own_coco, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for split in ("train", "val"):
        shutil.move(own_coco / "annotations" / f"instances_{split}.json", elsewhere / f"{split}.json")
    with pytest.raises(FileNotFoundError, match="instances_train.json"):
        coco_data(own_coco)
    absolute = (str(elsewhere / "train.json"), str(elsewhere / "val.json"), str(elsewhere / "val.json"))
    assert len(coco_data(own_coco, annotations=absolute).val_set) == N_VAL
    (own_coco / "ann").mkdir()
    shutil.copy(elsewhere / "train.json", own_coco / "ann" / "t.json")
    shutil.copy(elsewhere / "val.json", own_coco / "ann" / "v.json")
    dm = coco_data(own_coco, annotations=("ann/t.json", "ann/v.json", "ann/v.json"))  # relative to root
    assert len(dm.train_set) == N_TRAIN and dm.classes == list(CLASSES)


# --- VOC -----------------------------------------------------------------------------------------


def test_voc_metric_eval_size_and_difficult(voc_root):
    dm = DetectionData(str(voc_root), format="voc", splits=VOC_SPLITS, classes=list(CLASSES), num_workers=0)
    assert dm.metric == "voc" and dm.eval_size == (600, 1000) and dm.classes == list(CLASSES)
    assert dm.test_set is dm.val_set and len(dm.train_set) == N_TRAIN and len(dm.test_set) == N_TEST
    n_objects = [len(item["objects"]) for item in make_images(N_TEST, seed=2)]  # the generator's test images
    flags = []
    for batch in dm.test_dataloader():
        for image, target, path in zip(batch["images"], batch["targets"], batch["paths"]):
            assert tuple(image.shape) == (3, H, W) and "masks" not in target
            n = n_objects[int(Path(path).stem.split("_")[-1])]
            expected = [False] * (n - 1) + [n >= 2]  # the last of two or more objects is difficult
            assert target["difficult"].tolist() == expected
            flags += expected
    assert any(flags) and len(flags) == sum(n_objects)


def test_parse_voc_split():
    assert parse_voc_split("2007/trainval+2012/trainval") == [("2007", "trainval"), ("2012", "trainval")]
    assert parse_voc_split("2007/test") == [("2007", "test")]
    for bad in ("2007", "2007/trainval+2012", "/test"):
        with pytest.raises(ValueError, match="YEAR/IMAGE_SET"):
            parse_voc_split(bad)


# --- training loader: repeats and resumability ---------------------------------------------------


def test_repeats_cover_the_train_set_three_times(coco_root):
    dm = coco_data(coco_root, repeats=3, batch_size=4)
    loader = dm.train_dataloader()
    assert len(loader) == math.ceil(3 * N_TRAIN / 4)
    indices = [i for i, _ in loader.sampler]
    assert sorted(indices) == list(range(3 * N_TRAIN))
    repeated = loader.dataset.dataset
    for i in (0, N_TRAIN - 1):
        assert repeated[i][1]["path"] == repeated[i + N_TRAIN][1]["path"] == repeated[i + 2 * N_TRAIN][1]["path"]
        assert repeated[i][1]["path"] == dm.train_set.path(i)
    paths = [p for batch in loader for p in batch["paths"]]
    assert sorted(paths) == sorted(3 * [dm.train_set.path(i) for i in range(N_TRAIN)])


def first_batch(root: Path, seed: int) -> dict:
    return next(iter(coco_data(root, seed=seed).train_dataloader()))


def test_training_loader_is_reproducible_by_seed(coco_root):
    assert isinstance(coco_data(coco_root).train_dataloader(), ResumableLoader)
    a = first_batch(coco_root, seed=0)
    torch.manual_seed(1234)  # the global RNG must not matter: augmentation is seeded per image
    b = first_batch(coco_root, seed=0)
    assert a["paths"] == b["paths"]
    for x, y, tx, ty in zip(a["images"], b["images"], a["targets"], b["targets"]):
        assert x.shape == y.shape and torch.equal(x, y) and torch.equal(tx["boxes"], ty["boxes"])
    c = first_batch(coco_root, seed=1)
    same = c["paths"] == a["paths"] and all(x.shape == y.shape and torch.equal(x, y)
                                            for x, y in zip(a["images"], c["images"]))  # fmt: skip
    assert not same


def test_training_loader_resumes_mid_epoch(coco_root):
    loader = coco_data(coco_root).train_dataloader()
    full = [batch["paths"] for batch in loader]
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 1}
    resumed = coco_data(coco_root).train_dataloader()
    resumed.load_state_dict(state)
    assert [batch["paths"] for batch in resumed] == full[1:]


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, error, words", [
    (dict(format="yolo"), ValueError, "unknown detection format 'yolo'"),
    (dict(metric="f1"), ValueError, "unknown detection metric 'f1'"),
    (dict(batch_size=0), ValueError, "`batch_size` and `repeats` must be at least 1, got 0"),
    (dict(repeats=0), ValueError, "must be at least 1, got 2 and 0"),
    (dict(format="voc", annotations=("a.json", "b.json", "c.json")), ValueError, "`annotations` takes"),
    (dict(splits=("train", "val")), ValueError, "three names"),
])  # fmt: skip
def test_bad_options(coco_root, kw, error, words):
    with pytest.raises(error, match=re.escape(words)):
        DetectionData(str(coco_root), **{"splits": COCO_SPLITS, **SMALL, **kw})


def test_missing_root_is_named(tmp_path):
    missing = tmp_path / "no_such_data"
    with pytest.raises(FileNotFoundError, match="no_such_data"):
        DetectionData(str(missing), num_workers=0)


def test_val_categories_must_match_train(own_coco):
    def rename(data):
        data["categories"][2]["name"] = "blob"

    edit_json(own_coco / "annotations" / "instances_val.json", rename)
    with pytest.raises(ValueError) as info:
        coco_data(own_coco)
    message = str(info.value)
    assert "['square', 'disc', 'blob']" in message and "['square', 'disc', 'triangle']" in message
    assert "'val'" in message and "'train'" in message


def test_malformed_annotation_error_or_drop(own_coco):
    json_file = own_coco / "annotations" / "instances_train.json"

    def negative_width(data):
        data["annotations"][1]["bbox"][2] = -5.0

    edit_json(json_file, negative_width)
    aid = json.loads(json_file.read_text())["annotations"][1]["id"]
    with pytest.raises(BadAnnotationError, match=rf"instances_train\.json.*annotation id {aid}\b"):
        coco_data(own_coco, on_bad_annotation="error")
    with pytest.warns(UserWarning, match="dropped 1 malformed"):
        dm = coco_data(own_coco)
    assert len(dm.train_set.problems) == 1 and f"annotation id {aid}" in dm.train_set.problems[0]


# --- predict -------------------------------------------------------------------------------------


def test_predict_folder(coco_root, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    sizes = {"a.jpg": (50, 40), "b.png": (70, 30), "c.jpg": (33, 61)}  # (W, H)
    for name, size in sizes.items():
        Image.new("RGB", size, (200, 100, 50)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    dm = coco_data(coco_root, predict_path=str(folder))
    paths = []
    for batch in dm.predict_dataloader():
        assert batch["skipped"] == []
        for image, target, path in zip(batch["images"], batch["targets"], batch["paths"]):
            w, h = sizes[Path(path).name]
            assert image.dtype == torch.float32 and tuple(image.shape) == (3, h, w)
            assert abs(float(image[0].mean()) - 200 / 255) < 0.02  # scaled to [0, 1]
            assert target["boxes"].shape == (0, 4) and target["labels"].numel() == 0
        paths += batch["paths"]
    assert paths == [str(folder / name) for name in sorted(sizes)]


def test_predict_defaults_to_test_split_and_missing_path_raises(coco_root, tmp_path):
    dm = coco_data(coco_root)
    assert len(dm.predict_dataloader().dataset) == N_VAL
    dm = coco_data(coco_root, predict_path=str(tmp_path / "gone"))  # checked when the loader is made
    with pytest.raises(FileNotFoundError, match="gone"):
        dm.predict_dataloader()


# --- processes -----------------------------------------------------------------------------------


def pretend_process(monkeypatch, rank: int, world: int) -> None:
    """Make the data module see process ``rank`` of ``world`` without a trainer or a process group."""
    for module in (detection_data, loading):  # wherever the module looks ``dist_info`` up
        if hasattr(module, "dist_info"):
            monkeypatch.setattr(module, "dist_info", lambda: (rank, world))


def test_eval_loader_splits_images_across_processes(coco_root, monkeypatch):
    dm = coco_data(coco_root)
    every = [dm.val_set.path(i) for i in range(N_VAL)]
    shares = {}
    for rank in (0, 1):
        pretend_process(monkeypatch, rank, 2)
        shares[rank] = [p for batch in dm.val_dataloader() for p in batch["paths"]]
    assert shares[0] == every[0::2] and shares[1] == every[1::2]
    assert sorted(shares[0] + shares[1]) == sorted(every)


def test_train_loader_splits_across_processes(coco_root, monkeypatch):
    dm = coco_data(coco_root)
    shares = []
    for rank in (0, 1):
        pretend_process(monkeypatch, rank, 2)
        shares.append([i for i, _ in dm.train_dataloader().sampler])
    assert len(shares[0]) == len(shares[1]) == N_TRAIN // 2
    assert sorted(shares[0] + shares[1]) == list(range(N_TRAIN))


def test_training_drops_images_without_annotations_as_mmdet(own_coco):
    """mmdet's filter_empty_gt: no annotation (crowd ones count) or a side under 32 px -> not trained on."""
    path = own_coco / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    ids = sorted(im["id"] for im in data["images"])
    empty, crowd_only, tiny = ids[0], ids[1], ids[2]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != empty]
    for a in data["annotations"]:
        if a["image_id"] == crowd_only:
            a["iscrowd"] = 1
    next(im for im in data["images"] if im["id"] == tiny).update(height=31)
    path.write_text(json.dumps(data))
    dm = coco_data(own_coco, on_bad_image="skip")  # the tiny image's file no longer matches its size; never read
    kept = set(dm.train_set.image_ids)
    assert empty not in kept and tiny not in kept and crowd_only in kept
    assert dm.train_filtered == 2 and len(dm.train_set) == N_TRAIN - 2
    assert len(coco_data(own_coco, on_bad_image="skip", filter_empty_gt=False).train_set) == N_TRAIN
    # evaluation splits keep every image
    assert len(dm.val_set) == N_VAL
