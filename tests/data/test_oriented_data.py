"""DOTA / STAR readers, the release's oriented transforms, and the OrientedData module."""
import math

import pytest
import torch
from oriented_data import corners, write_oriented_folder
from torchvision import tv_tensors

from monatune.data import BadAnnotationError, OrientedData, read_dota, read_star
from monatune.data.oriented import RResize, RRandomFlip, collate_oriented, oriented_transforms, read_devkit_labels
from monatune.ops import cxcywhr_to_le90, le90_to_cxcywhr, norm_le90


def line(cx, cy, w, h, theta, name, difficult=0):
    return " ".join(f"{v:.3f}" for p in corners(cx, cy, w, h, theta) for v in p) + f" {name} {difficult}"


@pytest.mark.parametrize("layout", ["annfiles", "labelTxt"])
def test_both_layouts_headers_and_le90_boxes(tmp_path, layout):
    root = write_oriented_folder(tmp_path / "s", 1, layout=layout, header=True, objects=(0, 0))
    (root / layout / "P0000.txt").write_text("imagesource:GoogleEarth\ngsd:null\n"
                                             + line(40, 30, 30, 10, 0.4, "ship", 1) + "\n"
                                             + line(60, 50, 20, 8, -1.2, "plane") + "\n")  # fmt: skip
    ds = read_dota(root)
    image, target = ds[0]
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].format.name == "CXCYWHR"
    le90 = cxcywhr_to_le90(target["boxes"].as_subclass(torch.Tensor))
    assert le90.flatten().tolist() == pytest.approx([40, 30, 30, 10, 0.4, 60, 50, 20, 8, -1.2], abs=2e-3)
    assert target["labels"].tolist() == [7, 1] and target["difficult"].tolist() == [1, 0]
    assert target["image_id"] == "P0000" and image.shape == (3, 96, 96)


def test_bad_lines_are_named_dropped_or_stop_the_run(tmp_path):
    root = write_oriented_folder(tmp_path / "s", 1, objects=(0, 0))
    (root / "annfiles" / "P0000.txt").write_text("\n".join([
        line(40, 30, 30, 10, 0.4, "ship"),
        "1 2 3 4 5 6 7 ship 0",  # too few numbers
        line(40, 30, 30, 10, 0.4, "dragon"),  # unknown class
        "1 1 a 1 2 2 1 2 ship 0",  # not a number
        line(40, 30, 30, 1.0, 0.4, "ship"),  # a side under 2 px
    ]) + "\n")  # fmt: skip
    with pytest.warns(UserWarning, match="dropped 4 malformed"):
        ds = read_dota(root)
    assert ds[0][1]["labels"].tolist() == [7]
    assert [p.split(": ", 1)[0].rsplit(":", 1)[-1] for p in ds.problems] == ["2", "4", "3", "5"]
    assert any("dragon" in p for p in ds.problems) and any("degenerate" in p for p in ds.problems)
    with pytest.raises(BadAnnotationError, match=r"P0000\.txt:2"):
        read_dota(root, on_bad_annotation="error")


def test_star_classes_and_test_split_without_annotations(tmp_path):
    root = write_oriented_folder(tmp_path / "t", 2, classes=("tank", "roundabout"), layout=None)
    ds = read_star(root)
    assert not ds.has_annotations and len(ds) == 2 and len(ds[0][1]["labels"]) == 0
    assert ds.classes[4] == "tank" and len(ds.classes) == 48


def test_missing_image_and_corrupt_image(tmp_path):
    root = write_oriented_folder(tmp_path / "s", 2)
    (root / "images" / "P0001.png").unlink()
    with pytest.raises(FileNotFoundError, match="P0001"):
        read_dota(root)
    with pytest.warns(UserWarning):
        assert len(read_dota(root, on_bad_image="skip")) == 1
    root = write_oriented_folder(tmp_path / "c", 2)
    (root / "images" / "P0001.png").write_bytes(b"not a png")
    ds = read_dota(root, on_bad_image="skip")
    batch = collate_oriented([ds[0], ds[1]])
    assert len(batch["images"]) == 1 and batch["skipped"] == [str(root / "images" / "P0001.png")]


def boxes(values, size=(100, 80)):
    return tv_tensors.BoundingBoxes(le90_to_cxcywhr(torch.tensor(values)), format="CXCYWHR", canvas_size=size)


@pytest.mark.parametrize("direction", ["horizontal", "vertical", "diagonal"])
def test_flips_follow_mmrotate(direction):
    W, H = 80, 100  # canvas (H, W) = (100, 80)
    le90 = [[20.0, 30.0, 30.0, 10.0, 0.5], [50.0, 70.0, 20.0, 6.0, -1.3]]
    image = tv_tensors.Image(torch.arange(3 * H * W, dtype=torch.float32).reshape(3, H, W))
    flip = RRandomFlip()
    params = {"direction": direction, "size": (H, W)}
    out_image = flip.transform(image, params)
    out = cxcywhr_to_le90(flip.transform(boxes(le90), params).as_subclass(torch.Tensor))
    for (cx, cy, w, h, t), got in zip(le90, out.tolist()):
        # mmrotate RRandomFlip.bbox_flip (le90)
        if direction == "horizontal":
            want = [W - cx - 1, cy, w, h, float(norm_le90(torch.tensor(math.pi - t)))]
        elif direction == "vertical":
            want = [cx, H - cy - 1, w, h, float(norm_le90(torch.tensor(math.pi - t)))]
        else:
            want = [W - cx - 1, H - cy - 1, w, h, t]
        assert got[:4] == pytest.approx(want[:4], abs=1e-4)
        assert math.cos(2 * (got[4] - want[4])) == pytest.approx(1.0, abs=1e-6)  # the same rectangle
    expected = image.flip(-1) if direction == "horizontal" else image.flip(-2) if direction == "vertical" else image.flip(-1).flip(-2)
    assert torch.equal(out_image, expected)


def test_rresize_follows_mmrotate():
    image = tv_tensors.Image(torch.zeros(3, 300, 500, dtype=torch.uint8))
    box = boxes([[100.0, 50.0, 40.0, 10.0, 0.3]], size=(300, 500))
    resize = RResize(1024)
    params = resize.make_params([image, box])
    assert params["size"] == (614, 1024)  # int(300 * 2.048 + 0.5)
    out_image, out_box = resize.transform(image, params), resize.transform(box, params)
    sx, sy = 1024 / 500, 614 / 300
    got = cxcywhr_to_le90(out_box.as_subclass(torch.Tensor))[0].tolist()
    assert got == pytest.approx([100 * sx, 50 * sy, 40 * math.sqrt(sx * sy), 10 * math.sqrt(sx * sy), 0.3], abs=1e-4)
    assert out_image.shape == (3, 614, 1024) and out_box.canvas_size == (614, 1024)


def test_data_module_horizontal_boxes_filter_and_batches(tmp_path):
    write_oriented_folder(tmp_path / "d" / "trainval", 4, size=(120, 80))
    (tmp_path / "d" / "trainval" / "annfiles" / "P0003.txt").write_text("")  # no object: filtered out of training
    write_oriented_folder(tmp_path / "d" / "test", 2, layout=None)
    data = OrientedData(str(tmp_path / "d"), format="dota", batch_size=2, num_workers=0, size=64)
    assert data.num_classes == 15 and data.train_filtered == 1 and len(data.train_set) == 3
    assert not data.full_images and data.has_val_annotations and not data.has_test_annotations
    image, target = data.train_set[0]
    assert max(image.shape[-2:]) == 64 and image.dtype == torch.float32
    angles = cxcywhr_to_le90(target["boxes"].as_subclass(torch.Tensor))[:, 4]
    assert all(min(abs(a - 0.0), abs(a + math.pi / 2)) < 1e-5 for a in angles.tolist())  # horizontal boxes
    val_angles = cxcywhr_to_le90(data.val_set[0][1]["boxes"].as_subclass(torch.Tensor))[:, 4]
    assert any(min(abs(a), abs(a + math.pi / 2)) > 1e-3 for a in val_angles.tolist())  # evaluation keeps rotated boxes
    batch = next(iter(data.train_dataloader()))
    assert len(batch["images"]) == len(batch["targets"]) == 2


def test_star_data_module_reads_test_images_lazily(tmp_path):
    classes = ("tank", "roundabout")
    write_oriented_folder(tmp_path / "s" / "train", 2, classes=classes)
    write_oriented_folder(tmp_path / "s" / "test", 2, size=(300, 200), classes=classes)
    data = OrientedData(str(tmp_path / "s"), format="star", batch_size=2, num_workers=0)
    assert data.full_images
    image, target = data.test_set[0]
    assert image is None and target["boxes"].canvas_size == (200, 300)  # the task reads it by windows


def test_devkit_labels(tmp_path):
    root = write_oriented_folder(tmp_path / "r", 1, layout="labelTxt", header=True, objects=(2, 2))
    truth = read_devkit_labels(root / "labelTxt", ["P0000", "P9999"])
    assert len(truth["P0000"]) == 2 and truth["P9999"] == []
    assert all(len(p) == 8 and d == 0 for p, _, d in truth["P0000"])


def test_bad_settings(tmp_path):
    write_oriented_folder(tmp_path / "d" / "trainval", 1)
    with pytest.raises(ValueError, match="unknown oriented-detection format"):
        OrientedData(str(tmp_path / "d"), format="hrsc")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OrientedData(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="`flip` must be"):
        OrientedData(str(tmp_path / "d"), flip="diagonal")
    with pytest.raises(FileNotFoundError, match="no images/"):
        OrientedData(str(tmp_path / "d"), splits=["trainval", "val", "val"])


@pytest.mark.parametrize("flip, expected", [(True, [0.25] * 3), ("three-way", [0.25] * 3), ("horizontal", [0.5, 0, 0]),
                                            (False, None), ("none", None)])  # fmt: skip
def test_flip_settings(flip, expected):
    flips = [t for t in oriented_transforms(True, flip=flip).transforms if isinstance(t, RRandomFlip)]
    assert (flips[0].p if flips else None) == expected
    if expected is not None:  # the drawn direction follows the probabilities: "horizontal" never flips vertically
        torch.manual_seed(0)
        drawn = [flips[0].make_params([torch.zeros(3, 4, 4)])["direction"] for _ in range(400)]
        share = {d: drawn.count(d) / 400 for d in ("horizontal", "vertical", "diagonal", None)}
        for d, p in zip(("horizontal", "vertical", "diagonal"), expected):
            assert abs(share[d] - p) < 0.08
