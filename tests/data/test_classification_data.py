"""Reading classification data sets from tiny generated folders in each supported layout."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from scipy.io import savemat

from monatune.data.classification import (
    DEFAULT_SPLITS,
    FORMATS,
    VOC_CLASSES,
    BadAnnotationError,
    BadImageError,
    ClassificationDataset,
    build_classification_dataset,
    detect_format,
)
from monatune.data.images import Skipped

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def write_image(path: Path, color=RED, size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def build(root, split, **kw) -> ClassificationDataset:
    return build_classification_dataset(root, split, **kw)


def items(ds: ClassificationDataset) -> list[tuple[str, object]]:
    """(last two parts of the image path, target) of each item."""
    return [("/".join(Path(ds.path(i)).parts[-2:]), ds.targets[i]) for i in range(len(ds))]


# --- fixtures in each layout -------------------------------------------------------------------


@pytest.fixture
def imagefolder(tmp_path) -> Path:
    root = tmp_path / "folder"
    write_image(root / "train/cat/a.jpg", RED)
    write_image(root / "train/cat/b.png", GREEN)
    write_image(root / "train/dog/c.jpeg", BLUE)
    write_image(root / "train/dog/._c.jpeg", BLUE)  # macOS resource fork: not an image
    write(root / "train/dog/notes.txt", "not an image")
    (root / "train/.ipynb_checkpoints").mkdir()  # hidden: not a class
    write_image(root / "val/dog/d.png", GREEN)  # no cat folder in val: fine
    write_image(root / "test/cat/e.jpg", RED)
    write_image(root / "test/dog/f.jpg", BLUE)
    return root


@pytest.fixture
def release(tmp_path) -> Path:
    root = tmp_path / "release"
    for rel in ("train/x/a.jpg", "train/y/b.jpg", "train/y/c.jpg", "val/v1.jpg", "val/v 2.jpg"):
        write_image(root / rel)
    write(root / "meta/train.txt", "x/a.jpg 0\n\ny/b.jpg 2\ny/c.jpg 1\n")
    write(root / "meta/val.txt", "v1.jpg 1\nv 2.jpg 0\n")
    return root


@pytest.fixture
def flowers(tmp_path) -> Path:
    base = tmp_path / "fl" / "flowers-102"
    colors = [RED, GREEN, BLUE, RED, GREEN, BLUE, RED]
    for i, c in enumerate(colors, 1):
        write_image(base / "jpg" / f"image_{i:05d}.jpg", c)
    # as in the official files: 1-based labels [1, N], 1-based image ids per split
    savemat(base / "imagelabels.mat", {"labels": np.array([[1, 3, 3, 102, 2, 1, 50]], dtype=np.uint8)})
    savemat(base / "setid.mat", {"trnid": np.array([[2, 1]], dtype=np.uint16),
                                 "valid": np.array([[3, 4]], dtype=np.uint16),
                                 "tstid": np.array([[5, 6, 7]], dtype=np.uint16)})  # fmt: skip
    return tmp_path / "fl"


@pytest.fixture
def pets(tmp_path) -> Path:
    base = tmp_path / "pt" / "oxford-iiit-pet"
    for name in ("Abyssinian_1", "Abyssinian_2", "american_bulldog_1", "Bengal_1", "Abyssinian_3", "Bengal_2"):
        write_image(base / "images" / f"{name}.jpg")
    # image_id class_id species breed_id; class ids 1-based
    write(base / "annotations/trainval.txt",
          "Abyssinian_1 1 1 1\nAbyssinian_2 1 1 1\namerican_bulldog_1 2 2 1\nBengal_1 3 1 2\n")
    write(base / "annotations/test.txt", "Abyssinian_3 1 1 1\nBengal_2 3 1 2\namerican_bulldog_1 2 2 1\n")
    return tmp_path / "pt"


def voc_xml(*objects: tuple[str, int, tuple[int, int, int, int]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><pose>Left</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, d, b in objects
    )
    return f"<annotation><folder>VOC2007</folder><filename>x.jpg</filename>{objs}</annotation>"


VOC_IMAGES = {
    # id: objects (name, difficult, box)
    "000001": [("person", 0, (1, 1, 5, 5)), ("dog", 0, (1, 1, 100, 50)), ("person", 1, (1, 1, 200, 200))],
    "000002": [("cat", 1, (1, 1, 300, 300)), ("chair", 0, (10, 10, 20, 20))],
    "000003": [("bird", 1, (1, 1, 10, 10)), ("car", 1, (1, 1, 40, 40)), ("bird", 1, (5, 5, 30, 30))],
    "000004": [("horse", 0, (0, 0, 10, 10)), ("sheep", 0, (0, 0, 5, 20))],  # equal areas: first wins
}


@pytest.fixture
def voc(tmp_path) -> Path:
    base = tmp_path / "vc" / "VOCdevkit" / "VOC2007"
    for image_id, objects in VOC_IMAGES.items():
        write_image(base / "JPEGImages" / f"{image_id}.jpg")
        write(base / "Annotations" / f"{image_id}.xml", voc_xml(*objects))
    write(base / "ImageSets/Main/trainval.txt", "000001\n000002\n")
    write(base / "ImageSets/Main/test.txt", "000003\n000004\n")
    return tmp_path / "vc"


# --- imagefolder -----------------------------------------------------------------------------------


def test_imagefolder_reads_classes_targets_and_paths(imagefolder):
    ds = build(imagefolder, "train")
    assert (ds.format, ds.split, ds.multilabel, ds.classes) == ("imagefolder", "train", False, ["cat", "dog"])
    assert items(ds) == [("cat/a.jpg", 0), ("cat/b.png", 0), ("dog/c.jpeg", 1)]
    assert ds.path(2) == str(imagefolder / "train/dog/c.jpeg")
    image, target = ds[1]
    assert image.mode == "RGB" and image.size == (8, 8) and image.getpixel((0, 0)) == GREEN and target == 0


def test_imagefolder_val_uses_train_classes_and_transform_applies(imagefolder):
    ds = build(imagefolder, "val", transform=lambda im: ("seen", im.getpixel((3, 3))))
    assert ds.classes == ["cat", "dog"] and items(ds) == [("dog/d.png", 1)]
    assert ds[0] == (("seen", GREEN), 1)


def test_imagefolder_explicit_classes_list_and_file(imagefolder, tmp_path):
    ds = build(imagefolder, "test", classes=["dog", "cat", "bird"])
    assert ds.classes == ["dog", "cat", "bird"] and items(ds) == [("cat/e.jpg", 1), ("dog/f.jpg", 0)]
    names = write(tmp_path / "names.txt", "dog\n\ncat\n")
    assert build(imagefolder, "test", classes=str(names)).classes == ["dog", "cat"]
    with pytest.raises(ValueError, match="distinct"):
        build(imagefolder, "test", classes=["dog", "dog"])


def test_imagefolder_unknown_class_folder_in_val(imagefolder):
    write_image(imagefolder / "val/horse/h.jpg")
    with pytest.raises(BadAnnotationError) as e:
        build(imagefolder, "val")
    assert str(imagefolder / "val/horse") in str(e.value) and "2 classes" in str(e.value)


def test_imagefolder_empty_class_folder_is_refused_unless_named(imagefolder):
    (imagefolder / "train/bird").mkdir()  # no images: it would be a class no image teaches
    write(imagefolder / "train/eel/notes.txt", "not an image")
    with pytest.raises(ValueError) as e:
        build(imagefolder, "train")
    message = str(e.value)
    assert f"'{imagefolder / 'train/bird'}', '{imagefolder / 'train/eel'}' hold no images" in message
    assert "classes=" in message
    named = build(imagefolder, "train", classes=["bird", "cat", "dog", "eel"])  # named by the user: intended
    assert named.classes == ["bird", "cat", "dog", "eel"] and sorted(set(named.targets)) == [1, 2]
    write_image(imagefolder / "train/bird/deep/x.png")  # an image in a sub-folder counts, as make_dataset takes it
    (imagefolder / "train/eel/notes.txt").unlink()
    (imagefolder / "train/eel").rmdir()
    assert build(imagefolder, "train").classes == ["bird", "cat", "dog"]


def test_imagefolder_unknown_split_lists_folders(imagefolder):
    with pytest.raises(ValueError, match="unknown split 'valid'.*available: test, train, val"):
        build(imagefolder, "valid")


# --- release lists ---------------------------------------------------------------------------------


def test_release_classes_from_train_labels(release):
    ds = build(release, "val")
    assert ds.format == "release" and ds.classes == ["0", "1", "2"]
    assert [ds.path(i) for i in range(2)] == [str(release / "val/v1.jpg"), str(release / "val/v 2.jpg")]
    assert ds.targets == [1, 0] and ds[1][1] == 0
    assert build(release, "train").targets == [0, 2, 1]


def test_release_classes_txt_and_explicit(release, tmp_path):
    write(release / "meta/classes.txt", "ant\nbee\ncow\nelk\n")
    assert build(release, "train").classes == ["ant", "bee", "cow", "elk"]
    assert build(release, "train", classes=["a", "b", "c"]).classes == ["a", "b", "c"]
    with pytest.raises(ValueError, match="unknown split 'test'.*available: train, val"):
        build(release, "test")  # classes.txt is not a split


def test_release_label_out_of_range_names_file_and_line(release):
    write(release / "meta/classes.txt", "a\nb\n")
    with pytest.raises(BadAnnotationError) as e:
        build(release, "train")
    msg = str(e.value)
    assert f"label 2 on line 3 of '{release / 'meta/train.txt'}'" in msg and "2 classes" in msg


@pytest.mark.parametrize("line, expect", [("y/b.jpg", "line 2 of"), ("y/b.jpg two", "line 2 of"),
                                          ("y/b.jpg -1", "label -1 on line 2 of")])  # fmt: skip
def test_release_malformed_lines(release, line, expect):
    write(release / "meta/val.txt", f"v1.jpg 1\n{line}\n")
    with pytest.raises(BadAnnotationError) as e:
        build(release, "val")
    assert f"{expect} '{release / 'meta/val.txt'}'" in str(e.value)


def test_release_missing_image(release):
    write(release / "meta/val.txt", "v1.jpg 1\n\ngone.jpg 0\n")
    with pytest.raises(BadImageError) as e:
        build(release, "val")
    assert str(release / "val/gone.jpg") in str(e.value) and "line 3" in str(e.value)
    ds = build(release, "val", on_bad_image="skip")
    assert ds[0][1] == 1 and ds[1] == Skipped(str(release / "val/gone.jpg")) and ds.skipped == 1


# --- torchvision layouts ---------------------------------------------------------------------------


def test_flowers102_splits_labels_and_root_variants(flowers):
    ds = build(flowers, "train")
    assert ds.format == "flowers102" and len(ds.classes) == 102
    assert ds.classes[0] == "pink primrose" and ds.classes[101] == "blackberry lily"
    assert items(ds) == [("jpg/image_00002.jpg", 2), ("jpg/image_00001.jpg", 0)]
    assert np.abs(np.subtract(ds[0][0].getpixel((0, 0)), GREEN)).max() <= 2  # JPEG: near, not exact
    for root in (flowers, flowers / "flowers-102"):
        assert build(root, "test").targets == [1, 0, 49]
        assert build(root, "val", format="flowers102").targets == [2, 101]


def test_pets_classes_targets_and_root_variants(pets):
    for root in (pets, pets / "oxford-iiit-pet"):
        ds = build(root, "trainval")
        assert ds.format == "pets" and ds.classes == ["Abyssinian", "American Bulldog", "Bengal"]
        assert items(ds) == [("images/Abyssinian_1.jpg", 0), ("images/Abyssinian_2.jpg", 0),
                             ("images/american_bulldog_1.jpg", 1), ("images/Bengal_1.jpg", 2)]  # fmt: skip
    assert build(pets, "test").targets == [0, 2, 1]
    with pytest.raises(ValueError, match="unknown split 'val' for pets; available: trainval, test"):
        build(pets, "val")


def test_voc_multilabel_vectors(voc):
    ds = build(voc, "trainval", multilabel=True)
    assert ds.classes == list(VOC_CLASSES) and len(ds.classes) == 20 and ds.multilabel
    idx = VOC_CLASSES.index
    expected = torch.zeros(2, 20)
    expected[0, [idx("person"), idx("dog")]] = 1  # person also has a difficult box: still present
    expected[1, idx("cat")], expected[1, idx("chair")] = -1, 1  # cat only difficult: ignore
    image, target = ds[1]
    assert target.dtype == torch.float32 and torch.equal(ds.targets, expected) and torch.equal(target, expected[1])
    assert ds.path(0) == str(voc / "VOCdevkit/VOC2007/JPEGImages/000001.jpg")
    test = build(voc, "test", multilabel=True).targets
    assert test[0].tolist() == [-1.0 if c in ("bird", "car") else 0.0 for c in VOC_CLASSES]


def test_voc_single_label_largest_object(voc):
    # 000001: dog (largest non-difficult; the larger person is difficult); 000002: chair (cat difficult)
    assert build(voc, "trainval").targets == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("chair")]
    # 000003: all difficult -> largest of all (car); 000004: equal areas -> first object (horse)
    assert build(voc, "test").targets == [VOC_CLASSES.index("car"), VOC_CLASSES.index("horse")]


def test_voc_root_variants(voc):
    for root in (voc, voc / "VOCdevkit", voc / "VOCdevkit/VOC2007"):
        assert detect_format(root) == "voc2007"
        ds = build(root, "test")
        assert len(ds) == 2 and ds.path(1) == str(voc / "VOCdevkit/VOC2007/JPEGImages/000004.jpg")


@pytest.mark.parametrize("xml, expect", [
    ("<annotation><object><name>dog</name>", "cannot read VOC annotation"),
    (voc_xml(("unicorn", 0, (1, 1, 2, 2))), "named 'unicorn'"),
    ("<annotation><object><name>dog</name><difficult>0</difficult></object></annotation>", "needs a <bndbox>"),
])  # fmt: skip
def test_voc_bad_annotation_names_the_file(voc, xml, expect):
    bad = write(voc / "VOCdevkit/VOC2007/Annotations/000002.xml", xml)
    with pytest.raises(BadAnnotationError) as e:
        build(voc, "trainval", multilabel=True)
    assert str(bad) in str(e.value) and expect in str(e.value)


def test_multilabel_needs_voc(imagefolder):
    with pytest.raises(ValueError, match="multi-label targets need format 'voc2007'"):
        build(imagefolder, "train", multilabel=True)


# --- detection, defaults, argument errors --------------------------------------------------------


def test_detect_format_each_layout(imagefolder, release, flowers, pets, voc):
    found = {r: detect_format(r) for r in (imagefolder, release, flowers, flowers / "flowers-102", pets, voc)}
    assert list(found.values()) == ["imagefolder", "release", "flowers102", "flowers102", "pets", "voc2007"]
    assert build(pets / "oxford-iiit-pet", "test").format == "pets"


def test_detect_format_failure_lists_contents(tmp_path):
    write(tmp_path / "readme.md", "hi")
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError) as e:
        detect_format(tmp_path)
    assert "holds: images/, readme.md" in str(e.value) and "voc2007" in str(e.value) and "format=" in str(e.value)


def test_default_splits_build_for_every_format(imagefolder, release, flowers, pets, voc):
    write_image(release / "test/t.jpg")
    write(release / "meta/test.txt", "t.jpg 2\n")
    roots = {"imagefolder": imagefolder, "release": release, "flowers102": flowers, "pets": pets, "voc2007": voc}
    assert set(DEFAULT_SPLITS) == set(FORMATS) == set(roots)
    lengths = {f: [len(build(roots[f], s)) for s in DEFAULT_SPLITS[f]] for f in FORMATS}
    assert lengths == {"imagefolder": [3, 1, 2], "release": [3, 2, 1], "flowers102": [2, 2, 3],
                       "pets": [4, 3, 3], "voc2007": [2, 2, 2]}  # fmt: skip


def test_argument_errors(imagefolder, voc, tmp_path):
    with pytest.raises(ValueError, match="unknown data format 'coco'; choose one of imagefolder, release, "
                                         "flowers102, pets, voc2007"):  # fmt: skip
        build(imagefolder, "train", format="coco")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="on_bad_image must be one of error, skip, got 'ignore'"):
        build(imagefolder, "train", on_bad_image="ignore")
    with pytest.raises(ValueError, match="unknown split 'training' for voc2007; available: train, val, trainval, test"):
        build(voc, "training")
    with pytest.raises(FileNotFoundError, match="val.txt"):
        build(voc, "val")  # a known split whose list file is absent


# --- bad images ----------------------------------------------------------------------------------


def truncated_jpeg(path: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("kind", ["random bytes", "truncated jpeg", "deleted"])
def test_bad_image_errors_or_skips(imagefolder, kind):
    bad = imagefolder / "train/cat/b.png"
    if kind == "random bytes":
        bad = imagefolder / "train/cat/b.jpg"
        bad.write_bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())
    elif kind == "truncated jpeg":
        bad = truncated_jpeg(imagefolder / "train/cat/b.jpg")
    ds, skipping = build(imagefolder, "train"), build(imagefolder, "train", on_bad_image="skip")
    i = [ds.path(k) for k in range(len(ds))].index(str(bad))
    if kind == "deleted":
        bad.unlink()  # after construction: images are opened only in __getitem__
    with pytest.raises(BadImageError) as e:
        ds[i]
    assert f"'{bad}'" in str(e.value) and "data.on_bad_image=skip" in str(e.value)
    assert skipping[i] == Skipped(str(bad)) and skipping.skipped == 1
    assert skipping[len(ds) - 1][1] == 1 and skipping.skipped == 1  # good images still load
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
