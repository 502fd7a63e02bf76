"""Reading detection data (COCO JSON, VOC XML) from tiny generated sets, with v2 transforms and batching."""
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.transforms import v2

from monatune.data.classification import VOC_CLASSES, BadAnnotationError, BadImageError
from monatune.data.detection import (
    DetectionDataset,
    RandomSizeCrop,
    collate_detection,
    detection_transforms,
    read_coco,
    read_voc,
)
from monatune.data.images import Skipped

H, W = 48, 64


def rect(x1, y1, x2, y2) -> list[float]:
    """A rectangle polygon; pycocotools fills exactly (x2 - x1) * (y2 - y1) pixels for integer corners."""
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def write_jpeg(path: Path, shapes=(), size=(W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, (40, 40, 40))
    draw = ImageDraw.Draw(im)
    for (x1, y1, x2, y2), colour in shapes:
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)
    im.save(path, quality=95)
    return path


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of the column-major mask, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return {"counts": [int(c) for c in counts], "size": [int(s) for s in mask.shape]}


CROWD = np.zeros((H, W), np.uint8)
CROWD[40:46, 0:12] = 1  # 72 pixels
SOLID = np.zeros((H, W), np.uint8)
SOLID[20:40, 30:50] = 1  # 400 pixels

GOOD = [  # (id, image_id, category_id, bbox xywh, segmentation, iscrowd)
    (1, 1, 3, [8, 6, 20, 10], [rect(8, 6, 28, 16)], 0),
    (2, 1, 7, [30, 20, 20, 20], "compressed", 0),
    (3, 1, 3, [0, 40, 12, 6], "uncompressed", 1),
    (4, 1, 7, [56, 40, 16, 16], [rect(56, 40, 64, 48)], 0),  # partly outside: clipped to 56..64, 40..48
    (20, 9, 7, [4, 4, 10, 10], [rect(4, 4, 14, 14), [1, 1, 2, 2]], 0),  # a 2-point part is left out
]
BAD = {  # id -> (annotation, words its problem line must hold)
    30: ({"image_id": 9, "category_id": 3, "bbox": [5, 5, 0, 4], "segmentation": [rect(5, 5, 9, 9)]}, "empty"),
    31: ({"image_id": 9, "category_id": 3, "bbox": [100, 100, 5, 5], "segmentation": [rect(5, 5, 9, 9)]},
         "entirely outside"),
    32: ({"image_id": 9, "category_id": 99, "bbox": [5, 5, 4, 4], "segmentation": [rect(5, 5, 9, 9)]},
         "category_id 99"),
    33: ({"image_id": 9, "category_id": 3, "bbox": [1, 1, 4, 4], "segmentation": [[1, 1, 5, 5]]}, "3 or more points"),
    34: ({"image_id": 77, "category_id": 3, "bbox": [5, 5, 4, 4], "segmentation": [rect(5, 5, 9, 9)]}, "image_id 77"),
    35: ({"image_id": 9, "category_id": 3, "bbox": [5, 5, 4, 4], "segmentation": {"counts": [H * W], "size": [H, W]}},
         "zero area"),
    36: ({"image_id": 9, "category_id": 3, "bbox": [10, 10, 1, 1],
          "segmentation": [[10.1, 10.1, 10.3, 10.1, 10.3, 10.3]]}, "no pixel"),
    37: ({"image_id": 9, "category_id": 3, "segmentation": [rect(5, 5, 9, 9)]}, "no 'bbox'"),
    38: ({"image_id": 9, "category_id": 3, "bbox": [5, 5, 4, 4], "segmentation": {"counts": [10, 5], "size": [H, W]}},
         f"summing to {H}\\*{W}"),  # pycocotools would decode it past the end of the mask
}
MASK_ONLY = {33, 35, 36, 38}  # malformed only when masks are read


def coco_annotation(aid, image_id, cat, bbox, seg, iscrowd) -> dict:
    if seg == "compressed":
        seg = mask_utils.encode(np.asfortranarray(SOLID))
        seg["counts"] = seg["counts"].decode("ascii")  # as JSON stores it
    elif seg == "uncompressed":
        seg = uncompressed_rle(CROWD)
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": bbox, "segmentation": seg,
            "iscrowd": iscrowd, "area": float(bbox[2] * bbox[3])}


def write_coco(root: Path, bad_ids=tuple(BAD)) -> tuple[Path, Path]:
    images = root / "images"
    write_jpeg(images / "a.jpg", [((8, 6, 28, 16), (255, 0, 0)), ((30, 20, 50, 40), (0, 0, 255))])
    write_jpeg(images / "b.jpg")
    write_jpeg(images / "sub/c.jpg", [((4, 4, 14, 14), (0, 255, 0))])
    anns = [coco_annotation(*a) for a in GOOD] + [{"id": i, **BAD[i][0]} for i in bad_ids]
    data = {
        "images": [{"id": 9, "file_name": "sub/c.jpg", "height": H, "width": W},  # listed out of id order
                   {"id": 1, "file_name": "a.jpg", "height": H, "width": W},
                   {"id": 5, "file_name": "b.jpg", "height": H, "width": W}],
        "annotations": anns,
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    json_file = root / "instances.json"
    json_file.write_text(json.dumps(data))
    return images, json_file


@pytest.fixture
def coco(tmp_path) -> tuple[Path, Path]:
    return write_coco(tmp_path)


def read_quietly(*args, **kw) -> DetectionDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_coco(*args, **kw)


# --- COCO ----------------------------------------------------------------------------------------


def test_coco_items_boxes_and_labels(coco):
    ds = read_quietly(*coco)
    assert len(ds) == 3 and ds.image_ids == [1, 5, 9]  # sorted by image id
    assert ds.classes == ["__background__", "cat", "dog"] and ds.cat_ids == [3, 7]
    assert [Path(ds.path(i)).name for i in range(3)] == ["a.jpg", "b.jpg", "c.jpg"]
    image, t = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, H, W)
    assert image[:, 10, 15].tolist()[0] > 200 and image[:, 30, 40].tolist()[2] > 200  # red, blue rectangles
    assert isinstance(t["boxes"], tv_tensors.BoundingBoxes) and t["boxes"].dtype == torch.float32
    assert t["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY and tuple(t["boxes"].canvas_size) == (H, W)
    assert t["boxes"].tolist() == [[8, 6, 28, 16], [30, 20, 50, 40], [0, 40, 12, 46], [56, 40, 64, 48]]
    assert t["labels"].dtype == torch.int64 and t["labels"].tolist() == [1, 2, 1, 2]  # ids 3 -> 1, 7 -> 2
    assert t["iscrowd"].dtype == torch.int64 and t["iscrowd"].tolist() == [0, 0, 1, 0]
    assert t["area"].dtype == torch.float32 and t["area"].tolist() == [200, 400, 72, 256]  # the JSON's areas
    assert t["image_id"] == 1 and "difficult" not in t


def test_coco_masks_match_the_drawn_shapes(coco):
    ds = read_quietly(*coco)
    masks = ds[0][1]["masks"]
    assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.uint8 and masks.shape == (4, H, W)
    assert masks.sum(dim=(1, 2)).tolist() == [200, 400, 72, 64]  # polygon, compressed RLE, counts RLE, polygon
    expected = torch.zeros(H, W, dtype=torch.uint8)
    expected[6:16, 8:28] = 1
    assert torch.equal(masks[0], expected)
    assert torch.equal(masks[1], torch.from_numpy(SOLID)) and torch.equal(masks[2], torch.from_numpy(CROWD))
    assert ds[2][1]["masks"].sum().item() == 100  # the 2-point part added nothing


def test_image_without_annotations_has_empty_target(coco):
    _, t = read_quietly(*coco)[1]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, H, W)
    assert t["image_id"] == 5


def test_malformed_annotations_are_dropped_listed_and_warned_once(coco):
    with pytest.warns(UserWarning) as record:
        ds = read_coco(*coco)
    ours = [w for w in record if "malformed" in str(w.message)]
    assert len(ours) == 1 and f"dropped {len(BAD)} malformed annotation(s) of {len(GOOD) + len(BAD)}" in str(
        ours[0].message)
    assert len(ds.problems) == len(BAD)
    for line, (aid, (ann, words)) in zip(ds.problems, BAD.items()):
        assert line.startswith(f"{coco[1]}: annotation id {aid} (image {ann['image_id']}): ")
        assert words.replace("\\", "") in line
    _, t = ds[2]
    assert t["boxes"].tolist() == [[4, 4, 14, 14]] and t["labels"].tolist() == [2]


def test_without_masks_only_box_problems_count(coco):
    with pytest.warns(UserWarning):
        ds = read_coco(*coco, masks=False)
    assert [int(p.split("annotation id ")[1].split()[0]) for p in ds.problems] == sorted(set(BAD) - MASK_ONLY)
    _, t = ds[2]
    assert "masks" not in t and len(t["boxes"]) == 1 + len(MASK_ONLY)


@pytest.mark.parametrize("bad_id", sorted(BAD))
def test_error_policy_names_file_and_annotation(tmp_path, bad_id):
    images, json_file = write_coco(tmp_path, bad_ids=[bad_id])
    with pytest.raises(BadAnnotationError, match=f"instances.json: annotation id {bad_id} .*{BAD[bad_id][1]}"):
        read_coco(images, json_file, on_bad_annotation="error")


def test_good_set_reads_silently(tmp_path):
    images, json_file = write_coco(tmp_path, bad_ids=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = read_coco(images, json_file, on_bad_annotation="error")
    assert ds.problems == [] and sum(len(ds[i][1]["labels"]) for i in range(3)) == len(GOOD)


def test_bad_options_and_files(coco, tmp_path):
    with pytest.raises(ValueError, match="on_bad_annotation must be one of drop, error, got 'skip'"):
        read_coco(*coco, on_bad_annotation="skip")
    with pytest.raises(ValueError, match="on_bad_image"):
        read_coco(*coco, on_bad_image="drop")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(BadAnnotationError, match="broken.json"):
        read_coco(coco[0], broken)
    broken.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(BadAnnotationError, match="broken.json.*missing key 'categories'"):
        read_coco(coco[0], broken)
    broken.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [], "categories": []}))
    with pytest.raises(BadAnnotationError, match="missing key 'height'"):
        read_coco(coco[0], broken)


def test_bad_images_raise_or_are_skipped(coco):
    images, json_file = coco
    (images / "b.jpg").write_bytes(b"not a jpeg")
    write_jpeg(images / "sub/c.jpg", size=(W, H + 1))  # not the size the JSON says
    with pytest.raises(BadImageError, match="b.jpg"):
        read_quietly(images, json_file)[1]
    with pytest.raises(BadImageError, match="64x49 but its annotations say 64x48"):
        read_quietly(images, json_file)[2]
    ds = read_quietly(images, json_file, on_bad_image="skip")
    assert ds[1] == Skipped(str(images / "b.jpg")) and ds[2] == Skipped(str(images / "sub/c.jpg"))
    assert not isinstance(ds[0], Skipped) and ds.skipped == 2
    (images / "a.jpg").unlink()
    with pytest.raises(BadImageError, match="a.jpg' listed in .*instances.json"):
        read_quietly(images, json_file)
    assert read_quietly(images, json_file, on_bad_image="skip")[0] == Skipped(str(images / "a.jpg"))


# --- transforms and batching ---------------------------------------------------------------------


def test_flip_moves_boxes_and_masks_together(coco):
    plain = read_quietly(*coco)[0]
    image, t = read_quietly(*coco, transforms=v2.RandomHorizontalFlip(p=1.0))[0]
    assert torch.equal(image, plain[0].flip(-1))
    assert t["boxes"].tolist() == [[64 - 28, 6, 64 - 8, 16], [14, 20, 34, 40], [52, 40, 64, 46], [0, 40, 8, 48]]
    assert torch.equal(t["masks"], plain[1]["masks"].flip(-1))
    for box, mask in zip(t["boxes"].int().tolist(), t["masks"]):  # each mask fills its box exactly
        x1, y1, x2, y2 = box
        assert mask[y1:y2, x1:x2].all() and mask.sum() == (x2 - x1) * (y2 - y1)
    assert t["labels"].tolist() == plain[1]["labels"].tolist()


def test_sanitize_drops_emptied_boxes_with_everything_per_instance(coco):
    # a 16x16 centre crop (rows 16..32, cols 24..40) keeps only the 400-pixel square, as 16..40 -> 0..16 wide
    crop = v2.Compose([v2.CenterCrop(16), detection_transforms(True, kind="voc", hflip=False)])
    image, t = read_quietly(*coco, transforms=crop)[0]
    assert image.dtype == torch.float32 and image.shape == (3, 600, 600) and 0 <= image.min() <= image.max() <= 1
    assert t["labels"].tolist() == [2] and t["iscrowd"].tolist() == [0] and t["area"].tolist() == [400]
    assert t["masks"].shape == (1, 600, 600) and t["boxes"].tolist() == [[6 * 37.5, 4 * 37.5, 600, 600]]
    assert t["masks"][0].float().mean().item() == pytest.approx(((600 - 225) * (600 - 150)) / 600**2)


@pytest.mark.parametrize(
    "kind, train, hw, expected",
    [("coco", False, (48, 64), (48, 64)), ("voc", False, (100, 400), (100, 400)),  # the detector resizes these
     ("voc", True, (48, 64), (600, 800)), ("voc", True, (100, 400), (250, 1000))],
)  # fmt: skip
def test_detection_transforms_resize(kind, train, hw, expected):
    image = tv_tensors.Image(torch.full((3, *hw), 255, dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes([[0, 0, hw[1], hw[0]]], format="XYXY", canvas_size=hw),
              "labels": torch.tensor([1])}
    out, t = detection_transforms(train, kind=kind, hflip=False)(image, target)
    assert out.shape[-2:] == expected and out.dtype == torch.float32 and out.max() == 1.0
    assert t["boxes"].tolist() == [[0, 0, expected[1], expected[0]]]


def test_coco_training_resize_is_multi_scale():
    torch.manual_seed(0)
    transform = detection_transforms(True, kind="coco", crop=False)
    shorter = set()
    boxes = tv_tensors.BoundingBoxes([[0, 0, 32, 48]], format="XYXY", canvas_size=(48, 64))
    for _ in range(60):
        out, t = transform(tv_tensors.Image(torch.zeros(3, 48, 64, dtype=torch.uint8)), {"boxes": boxes})
        shorter.add(out.shape[-2])
        assert t["boxes"][0, 3] == out.shape[-2] and t["boxes"][0, 2] - t["boxes"][0, 0] == pytest.approx(
            out.shape[-1] / 2, abs=1)
        assert out.shape[-1] <= 1333
    assert shorter <= set(range(480, 801, 32)) and len(shorter) >= 5
    assert isinstance(pickle.loads(pickle.dumps(transform)), v2.Compose)  # data-loader workers can receive it
    with pytest.raises(ValueError, match="kind must be 'coco' or 'voc', got 'lvis'"):
        detection_transforms(True, kind="lvis")


def test_coco_crop_policy_moves_boxes_and_masks_together():
    """Half the draws take the release's second policy: resize to 400-600, a 384-600 crop, resize to 480-800."""
    torch.manual_seed(0)
    transform = detection_transforms(True, kind="coco")
    mask = torch.zeros(1, 48, 64, dtype=torch.uint8)
    mask[0, 10:30, 20:50] = 1
    ratios, kept = set(), 0
    for _ in range(60):
        target = {"boxes": tv_tensors.BoundingBoxes([[20.0, 10, 50, 30]], format="XYXY", canvas_size=(48, 64)),
                  "labels": torch.tensor([1]), "masks": tv_tensors.Mask(mask)}
        out, t = transform(tv_tensors.Image(torch.zeros(3, 48, 64, dtype=torch.uint8)), target)
        h, w = out.shape[-2:]
        assert {min(h, w), min(h, w) + 1} & set(range(480, 801, 32)) and max(h, w) <= 1333  # +1: int() rounding
        ratios.add(round(w / h, 2))
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
        if len(t["boxes"]):  # the mask's extent is the box, wherever the crop fell
            kept += 1
            ys, xs = torch.nonzero(t["masks"][0], as_tuple=True)
            extent = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            assert t["boxes"][0].tolist() == pytest.approx(extent, abs=max(h, w) / 64)  # masks resize by nearest
    assert 1.33 in ratios and len(ratios) > 3 and kept > 30  # uncropped draws keep 64/48; crops change the ratio


def test_random_size_crop_bounds():
    torch.manual_seed(0)
    crop = RandomSizeCrop(384, 600)
    for hw in ((800, 1000), (500, 450), (300, 1200)):
        for _ in range(20):
            out = crop(tv_tensors.Image(torch.zeros(3, *hw, dtype=torch.uint8)))
            h, w = out.shape[-2:]
            assert min(384, hw[0]) <= h <= min(600, hw[0]) and min(384, hw[1]) <= w <= min(600, hw[1])
    with pytest.raises(ValueError, match="0 < low <= high"):
        RandomSizeCrop(600, 384)


def test_collate_drops_skipped_and_moves_paths(coco):
    images, json_file = coco
    (images / "b.jpg").write_bytes(b"broken")
    ds = read_quietly(images, json_file, on_bad_image="skip")
    batch = collate_detection([ds[i] for i in range(3)])
    assert batch["skipped"] == [str(images / "b.jpg")] and len(batch["images"]) == len(batch["targets"]) == 2
    assert [Path(p).name for p in batch["paths"]] == ["a.jpg", "c.jpg"]
    assert all("path" not in t for t in batch["targets"]) and batch["targets"][1]["image_id"] == 9
    assert collate_detection([Skipped("x.jpg")]) == {"images": [], "targets": [], "paths": [], "skipped": ["x.jpg"]}


# --- VOC -----------------------------------------------------------------------------------------


def voc_xml(objects, size=(W, H)) -> str:
    """``objects``: (name, (xmin, ymin, xmax, ymax) or None, difficult)."""
    parts = [f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"]
    for name, box, difficult in objects:
        bnd = "" if box is None else "<bndbox>" + "".join(
            f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box)) + "</bndbox>"
        parts.append(f"<object><name>{name}</name><difficult>{int(difficult)}</difficult>{bnd}</object>")
    return "".join(parts) + "</annotation>"


def write_voc_year(devkit: Path, year: str, images: dict[str, list], image_set: str = "trainval") -> None:
    base = devkit / f"VOC{year}"
    for name, objects in images.items():
        write_jpeg(base / "JPEGImages" / f"{name}.jpg")
        (base / "Annotations").mkdir(parents=True, exist_ok=True)
        text = objects if isinstance(objects, str) else voc_xml(objects)
        (base / "Annotations" / f"{name}.xml").write_text(text)
    (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / "Main" / f"{image_set}.txt").write_text("\n".join(images) + "\n\n")


@pytest.fixture
def voc(tmp_path) -> Path:
    devkit = tmp_path / "VOCdevkit"
    write_voc_year(devkit, "2007", {
        "000001": [("dog", (9, 7, 28, 16), False), ("person", (1, 1, 64, 48), True)],
        "000002": [("cat", (5, 5, 20, 20), False), ("cat", (20, 5, 10, 20), False), ("unicorn", (1, 1, 5, 5), False),
                   ("car", None, False), ("bus", (70, 50, 90, 60), False)],
        "000003": "<annotation><size>",
    })  # fmt: skip
    write_voc_year(devkit, "2012", {"2012_000001": [("aeroplane", (2, 3, 70, 40), False)]})
    return tmp_path


def test_voc_boxes_labels_and_difficult(voc):
    with pytest.warns(UserWarning, match="dropped 5 malformed"):
        ds = read_voc(voc, "trainval")
    assert len(ds) == 2 and ds.classes == ["__background__", *VOC_CLASSES] and ds.cat_ids == list(range(1, 21))
    image, t = ds[0]
    assert image.shape == (3, H, W) and "masks" not in t and t["image_id"] == 0
    assert t["boxes"].tolist() == [[8, 6, 28, 16], [0, 0, 64, 48]]  # 1-based inclusive -> pixel edges
    assert t["labels"].tolist() == [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("person") + 1]
    assert t["difficult"].dtype == torch.bool and t["difficult"].tolist() == [False, True]
    assert t["iscrowd"].tolist() == [0, 0] and t["area"].tolist() == [200, 3072]
    assert ds[1][1]["boxes"].tolist() == [[4, 4, 20, 20]]


def test_voc_problems_name_file_and_object(voc):
    with pytest.warns(UserWarning):
        ds = read_voc(voc, "trainval")
    xml2, xml3 = (voc / "VOCdevkit/VOC2007/Annotations" / n for n in ("000002.xml", "000003.xml"))
    assert [p.split(": ", 2)[:2] for p in ds.problems] == [
        [str(xml2), "object 1 (cat)"], [str(xml2), "object 2 (unicorn)"], [str(xml2), "object 3 (car)"],
        [str(xml2), "object 4 (bus)"], [str(xml3), "cannot read it or its <size> (ParseError"]]  # fmt: skip
    assert "xmax < xmin" in ds.problems[0] and "bndbox" in ds.problems[2] and "entirely outside" in ds.problems[3]
    with pytest.raises(BadAnnotationError, match=r"000002.xml: object 1 \(cat\): box xmax < xmin"):
        read_voc(voc, "trainval", on_bad_annotation="error")


def test_voc_07_plus_12_and_roots(voc):
    with pytest.warns(UserWarning):
        ds = read_voc(voc, [("2007", "trainval"), ("2012", "trainval")])
    assert [Path(ds.path(i)).stem for i in range(len(ds))] == ["000001", "000002", "2012_000001"]
    assert ds.image_ids == [0, 1, 2] and ds[2][1]["boxes"].tolist() == [[1, 2, 64, 40]]  # clipped to 64x48
    only_2012 = read_voc(voc / "VOCdevkit" / "VOC2007", "trainval", year="2012")
    assert len(only_2012) == 1 and only_2012.problems == []
    assert len(read_voc(voc / "VOCdevkit", "trainval", year="2012")) == 1
    with pytest.raises(FileNotFoundError, match="VOC2012 image set 'test'"):
        read_voc(voc, "test", year="2012")
    with pytest.raises(ValueError, match="classes must be distinct"):
        read_voc(voc, "trainval", classes=["dog", "dog"])
    with pytest.raises(FileNotFoundError, match="no VOCdevkit"):
        read_voc(voc / "VOCdevkit" / "VOC2007" / "Annotations", "trainval")


def test_voc_difficult_follows_sanitize(voc):
    crop = v2.Compose([v2.CenterCrop((8, 8)), detection_transforms(True, kind="voc")])
    with pytest.warns(UserWarning):
        _, t = read_voc(voc, "trainval", transforms=crop)[0]
    assert t["difficult"].tolist() == [True] and t["labels"].tolist() == [VOC_CLASSES.index("person") + 1]


def test_training_resize_rounds_and_interpolates_as_mmcv():
    from monatune.data.detection import MMCVResize

    image = tv_tensors.Image(torch.rand(3, 333, 500))
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[0.0, 0.0, 500.0, 333.0]]), format="XYXY", canvas_size=(333, 500))
    out, out_boxes = MMCVResize([600], 1000)(image, boxes)
    assert out.shape[-2:] == (600, 901)  # mmcv: int(500 * 1.8018 + 0.5); torchvision's RandomShortestSize gives 900
    torch.testing.assert_close(out_boxes, torch.tensor([[0.0, 0.0, 901.0, 600.0]]))
    expected = torch.nn.functional.interpolate(image[None], size=(600, 901), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out.as_subclass(torch.Tensor), expected)  # no antialiasing, as cv2's INTER_LINEAR


def test_evaluation_keeps_sub_pixel_ground_truth_and_training_drops_it():
    from monatune.data.detection import detection_transforms

    image = tv_tensors.Image(torch.zeros(3, 40, 50, dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor([[1.0, 1.0, 1.5, 1.4], [5.0, 5.0, 20.0, 20.0]]),
                                                format="XYXY", canvas_size=(40, 50)),
              "labels": torch.tensor([1, 2]), "iscrowd": torch.tensor([0, 0]), "area": torch.tensor([0.2, 225.0])}  # fmt: skip
    _, kept = detection_transforms(False, kind="coco")(image, dict(target))
    assert kept["labels"].tolist() == [1, 2] and len(kept["boxes"]) == 2  # COCOeval counts the 0.5 x 0.4 box
    _, trained = detection_transforms(True, kind="coco", scales=[40], max_size=50, crop=False, hflip=False)(image, dict(target))
    assert trained["labels"].tolist() == [2]  # training drops boxes under 1 px, as mmdet
