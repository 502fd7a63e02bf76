"""Reading image files: 16-bit and float images are scaled by their bit depth, not saturated, in every
data set, in ``predict`` and in the prediction pictures."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shapes_detection import write_coco

from monatune.data import ClassificationData, DetectionData, SegmentationData, build_classification_dataset
from monatune.data.detection import read_coco
from monatune.data.images import BadImageError, Skipped, open_image, read_rgb
from monatune.data.segmentation import read_masks
from monatune.engine.callbacks import caption
from monatune.tasks.detection import draw_detections

W, H = 40, 32
GRADIENT16 = np.linspace(0, 65535, W * H).round().astype(np.uint16).reshape(H, W)  # the full 16-bit range
GRADIENT_F = np.linspace(0.0, 1.0, W * H, dtype=np.float32).reshape(H, W)


def save(path: Path, values: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path, **kwargs)
    return path


def grey16(path: Path) -> Path:
    """A 50% grey 16-bit PNG (32768 of 65535), which ``convert("RGB")`` saturates to 255."""
    return save(path, np.full((H, W), 32768, np.uint16))


def grey_float(path: Path) -> Path:
    """A 50% grey float32 TIFF (0.5), which ``convert("RGB")`` truncates to 0."""
    return save(path, np.full((H, W), 0.5, np.float32))


def rgb(image) -> np.ndarray:
    return np.asarray(image)


# --- read_rgb ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["16-bit png", "32-bit int tiff", "float tiff"])
def test_grey_images_deeper_than_8_bits_are_scaled_by_their_bit_depth(tmp_path, kind):
    if kind == "16-bit png":
        path, expected = save(tmp_path / "g.png", GRADIENT16), np.rint(GRADIENT16 / 257.0)
    elif kind == "32-bit int tiff":  # PIL's mode I, as it opens some 16-bit files
        path, expected = save(tmp_path / "g.tif", GRADIENT16.astype(np.int32)), np.rint(GRADIENT16 / 257.0)
    else:
        path, expected = save(tmp_path / "g.tif", GRADIENT_F), np.rint(GRADIENT_F.astype(np.float64) * 255)
    with Image.open(path) as im:
        assert im.mode in {"16-bit png": ("I;16", "I"), "32-bit int tiff": ("I",), "float tiff": ("F",)}[kind]
    image = read_rgb(str(path))
    assert image.mode == "RGB" and image.size == (W, H)
    values = rgb(image)
    assert values.dtype == np.uint8 and (values == expected[..., None]).all()
    assert values.min() == 0 and values.max() == 255  # the whole range, none of it saturated


@pytest.mark.parametrize("write", [grey16, grey_float], ids=["16-bit", "float"])
def test_half_grey_is_half_grey(tmp_path, write):
    path = write(tmp_path / ("g.png" if write is grey16 else "g.tif"))
    with Image.open(path) as im:
        assert im.convert("RGB").getpixel((0, 0)) in ((255, 255, 255), (0, 0, 0))  # what PIL alone gives
    assert abs(int(rgb(read_rgb(str(path)))[0, 0, 0]) - 128) <= 1
    assert (rgb(read_rgb(str(path))) == 128).all()


def test_float_values_outside_0_1_are_clipped_with_a_warning_naming_the_file(tmp_path):
    values = np.array([[-0.5, 0.0, 0.5, 1.0, 2.0, np.nan]], np.float32)
    path = save(tmp_path / "f.tif", values)
    with pytest.warns(UserWarning, match=r"'.*f\.tif' has values outside \[0, 1\] \(range -0\.5\.\.2, 3 pixels\)"):
        image = read_rgb(str(path))
    assert rgb(image)[0, :, 0].tolist() == [0, 0, 128, 255, 255, 0]
    save(tmp_path / "in.tif", GRADIENT_F)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_rgb(str(tmp_path / "in.tif"))  # values within [0, 1]: no warning


def test_32_bit_int_image_outside_16_bits_is_refused_or_skipped(tmp_path):
    path = save(tmp_path / "big.tif", np.array([[0, 70000]], np.int32))
    with pytest.raises(BadImageError, match=r"big\.tif.*values 0\.\.70000, outside 16 bits"):
        open_image(str(path), "error")
    assert open_image(str(path), "skip") == Skipped(str(path))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1"])
def test_8_bit_modes_go_through_pils_conversion(tmp_path, mode):
    source = Image.new("RGB", (W, H), (200, 100, 50)).convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    source.save(path)
    assert rgb(read_rgb(str(path))).tolist() == rgb(source.convert("RGB")).tolist()


# --- every reader goes through it ----------------------------------------------------------------


@pytest.fixture
def deep_images(tmp_path) -> Path:
    """A folder with a 50% grey 16-bit PNG and a 50% grey float TIFF."""
    folder = tmp_path / "deep"
    grey16(folder / "g16.png")
    grey_float(folder / "gf.tif")
    return folder


def unnormalise(image: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return image * std[:, None, None] + mean[:, None, None]


def test_classification_data_sets_and_predict(tmp_path, deep_images):
    root = tmp_path / "cls"
    for split in ("train", "val"):
        grey16(root / split / "a" / "g16.png")
        grey_float(root / split / "b" / "gf.tif")
    ds = build_classification_dataset(root, "train")
    assert len(ds) == 2 and all((rgb(ds[i][0]) == 128).all() for i in range(2))

    data = ClassificationData(str(root), batch_size=2, num_workers=0, image_size=16, resize_size=16,
                              predict_path=str(deep_images))  # fmt: skip
    for loader in (data.val_dataloader(), data.predict_dataloader()):
        (batch,) = list(loader)
        assert batch["skipped"] == [] and len(batch["image"]) == 2
        assert torch.allclose(unnormalise(batch["image"]), torch.tensor(128 / 255), atol=1e-5)


def test_detection_data_sets_and_predict(tmp_path, deep_images):
    folder = tmp_path / "coco" / "val"
    grey16(folder / "g16.png")
    grey_float(folder / "gf.tif")
    json_file = tmp_path / "coco" / "instances.json"
    images = [{"id": i, "file_name": name, "width": W, "height": H} for i, name in enumerate(["g16.png", "gf.tif"], 1)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100.0, "iscrowd": 0}
            for i in (1, 2)]  # fmt: skip
    json_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    ds = read_coco(folder, json_file, masks=False)
    assert all((ds[i][0] == 128).all() for i in range(2))  # uint8 images, the size the JSON says

    root = write_coco(tmp_path / "shapes", n_train=2, n_val=1)
    data = DetectionData(str(root), splits=("train", "val", "val"), num_workers=0, batch_size=2, train_scales=[64],
                         max_size=96, test_scale=64, predict_path=str(deep_images))  # fmt: skip
    (batch,) = list(data.predict_dataloader())
    assert batch["skipped"] == [] and len(batch["images"]) == 2
    assert all(torch.allclose(image, torch.tensor(128 / 255)) for image in batch["images"])


def test_segmentation_data_sets_and_predict(tmp_path, deep_images):
    root = tmp_path / "seg"
    for split in ("train", "val"):
        grey16(root / "images" / split / "g16.png")
        grey_float(root / "images" / split / "gf.tif")
        for name in ("g16", "gf"):
            save(root / "masks" / split / f"{name}.png", np.zeros((H, W), np.uint8))
    ds = read_masks(root, "train", classes=["x"])
    assert all((ds[i][0] == 128).all() for i in range(2))

    data = SegmentationData(str(root), format="masks", classes=["x"], batch_size=2, num_workers=0,
                            crop_size=(16, 16), scale=(W, H), predict_path=str(deep_images))  # fmt: skip
    for loader in (data.val_dataloader(), data.predict_dataloader()):
        (batch,) = list(loader)
        assert batch["skipped"] == [] and len(batch["images"]) == 2
        assert all(torch.allclose(unnormalise(image), torch.tensor(128 / 255), atol=1e-5) for image in batch["images"])


def test_prediction_pictures_show_the_image_the_model_saw(deep_images):
    for path in sorted(deep_images.iterdir()):
        pictured = caption({"path": str(path), "top": [{"name": "x", "score": 1.0}]})
        assert (rgb(pictured)[:H, :W] == 128).all()  # enlarged (nearest) from a tiny image: the grey stays grey
        drawn = draw_detections({"path": str(path), "labels": [], "boxes": [], "names": [], "scores": []})
        assert (rgb(drawn) == 128).all()
