"""Semantic-segmentation data (ADE20K and image/mask folders) from tiny generated sets, mmseg's transforms, batching."""
import colorsys
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision import tv_tensors

from monatune.data.classification import BadAnnotationError, BadImageError
from monatune.data.images import Skipped
from monatune.data.segmentation import (
    ADE20K_CLASSES,
    PadTo,
    PhotoMetricDistortion,
    ResizeToFit,
    SegmentationDataset,
    SegRandomCrop,
    collate_segmentation,
    fit_size,
    read_ade20k,
    read_masks,
    reduce_zero_label,
    segmentation_transforms,
)

H, W = 24, 32
PALETTE = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30], [30, 230, 230]], np.uint8)


def blocks(values, h=H, w=W) -> np.ndarray:
    """A ``[h, w]`` uint8 label map: quadrants (top-left, top-right, bottom-left, bottom-right) of ``values``."""
    m = np.empty((h, w), np.uint8)
    m[: h // 2, : w // 2], m[: h // 2, w // 2 :], m[h // 2 :, : w // 2], m[h // 2 :, w // 2 :] = values
    return m


def write_image(path: Path, h=H, w=W, colour=(90, 120, 150)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path, quality=95)
    return path


def write_mask(path: Path, labels: np.ndarray, mode="L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(labels, mode="L")
    if mode == "P":
        im = im.convert("P")  # same indices
        im.putpalette([255, 255, 255, 200, 0, 0, 0, 200, 0] + [0, 0, 0] * 253)  # colours that are not the indices
    im.save(path)
    return path


@pytest.fixture
def ade(tmp_path) -> Path:
    base = tmp_path / "ADEChallengeData2016"
    for split, names in (("training", ("ADE_train_00000001", "ADE_train_00000002")), ("validation", ("ADE_val_1",))):
        for name in names:
            write_image(base / "images" / split / f"{name}.jpg")
            write_mask(base / "annotations" / split / f"{name}.png", blocks((0, 1, 150, 255)))
    return tmp_path


# --- readers -------------------------------------------------------------------------------------


def test_ade20k_classes_are_mmsegs_150():
    assert len(ADE20K_CLASSES) == 150 == len(set(ADE20K_CLASSES))
    assert ADE20K_CLASSES[:5] == ("wall", "building", "sky", "floor", "tree")
    assert ADE20K_CLASSES[7] == "bed"
    assert ADE20K_CLASSES[-3:] == ("glass", "clock", "flag")


@pytest.mark.parametrize("where, split", [("parent", "training"), ("folder", "train")])
def test_read_ade20k_reduces_zero_label(ade, where, split):
    ds = read_ade20k(ade if where == "parent" else ade / "ADEChallengeData2016", split)
    assert len(ds) == 2 and ds.classes == list(ADE20K_CLASSES) and ds.ignore_index == 255
    assert Path(ds.path(1)).name == "ADE_train_00000002.jpg" and Path(ds.mask_path(1)).name == "ADE_train_00000002.png"
    image, mask = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, H, W)
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64 and mask.shape == (H, W)
    # file 0 ("other") -> 255, 1 -> 0, 150 -> 149, 255 -> 255
    assert torch.equal(mask, torch.from_numpy(blocks((255, 0, 149, 255)).astype(np.int64)))
    assert len(read_ade20k(ade, "validation")) == 1


def test_reduce_zero_label_is_mmsegs():
    values = np.array([0, 1, 2, 150, 254, 255], np.uint8)
    reference = values.copy()  # mmseg's LoadAnnotations(reduce_zero_label=True), in uint8
    reference[reference == 0] = 255
    reference = reference - 1
    reference[reference == 254] = 255
    assert reduce_zero_label(values).tolist() == reference.tolist() == [255, 0, 1, 149, 253, 255]


def test_ade20k_unpaired_files_are_listed(ade):
    base = ade / "ADEChallengeData2016"
    write_image(base / "images/training/lonely_image.jpg")
    write_mask(base / "annotations/training/lonely_mask.png", blocks((1, 1, 1, 1)))
    with pytest.raises(BadAnnotationError, match=r"1 of 3 images have no .*lonely_image\.jpg.*lonely_mask\.png"):
        read_ade20k(ade, "training")


def test_ade20k_layout_errors(tmp_path, ade):
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016/images"):
        read_ade20k(tmp_path / "nowhere", "training")
    with pytest.raises(ValueError, match="'training' or 'validation'"):
        read_ade20k(ade, "test")


def test_read_masks_palette_pngs_and_classes_file(tmp_path):
    write_image(tmp_path / "images/val/b.png")
    write_image(tmp_path / "images/val/a.jpg")
    write_mask(tmp_path / "masks/val/a.png", blocks((0, 1, 2, 255)), mode="P")
    write_mask(tmp_path / "masks/val/b.png", blocks((2, 2, 1, 0)), mode="L")
    (tmp_path / "classes.txt").write_text("road\ncar\n\nsky\n")
    ds = read_masks(tmp_path, "val", classes=tmp_path / "classes.txt")
    assert ds.classes == ["road", "car", "sky"] and [Path(ds.path(i)).name for i in range(2)] == ["a.jpg", "b.png"]
    assert Image.open(ds.mask_path(0)).mode == "P"
    assert torch.equal(ds[0][1], torch.from_numpy(blocks((0, 1, 2, 255)).astype(np.int64)))  # indices, not colours
    assert torch.equal(ds[1][1], torch.from_numpy(blocks((2, 2, 1, 0)).astype(np.int64)))
    reduced = read_masks(tmp_path, "val", classes=["car", "sky"], reduce_zero_label=True)
    assert torch.equal(reduced[1][1], torch.from_numpy(blocks((1, 1, 0, 255)).astype(np.int64)))


def test_read_masks_says_what_layout_it_expects(tmp_path):
    write_image(tmp_path / "images/train/a.jpg")
    with pytest.raises(FileNotFoundError, match=r"mask folder .*labels.*expected images/<split>/<name>\.jpg"):
        read_masks(tmp_path, "train", classes=["x"], masks="labels")


def bad_set(tmp_path, mask: np.ndarray, mode="L", classes=("a", "b", "c")) -> SegmentationDataset:
    write_image(tmp_path / "images/train/x.jpg")
    write_mask(tmp_path / "masks/train/x.png", mask, mode)
    return read_masks(tmp_path, "train", classes=list(classes))


def test_mask_of_another_size_names_both_files(tmp_path):
    ds = bad_set(tmp_path, np.zeros((H + 1, W), np.uint8))
    message = rf"mask '.*x\.png' is {W}x{H + 1} but its image '.*x\.jpg' is {W}x{H}"
    with pytest.raises(BadAnnotationError, match=message):
        ds[0]


def test_label_outside_the_classes_names_file_values_and_count(tmp_path):
    ds = bad_set(tmp_path, blocks((0, 7, 3, 255)))
    with pytest.raises(BadAnnotationError, match=r"mask '.*x\.png' has label\(s\) 3, 7 but there are 3 classes"):
        ds[0]


def test_corrupt_or_colour_mask(tmp_path):
    ds = bad_set(tmp_path, blocks((0, 1, 2, 0)))
    Path(ds.mask_path(0)).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(BadAnnotationError, match=r"cannot read mask '.*x\.png'"):
        ds[0]
    Image.new("RGB", (W, H), (1, 1, 1)).save(ds.mask_path(0))
    with pytest.raises(BadAnnotationError, match=r"mode-RGB image; masks must hold one class index"):
        ds[0]


def test_corrupt_image_is_skipped_or_raises(tmp_path):
    ds = bad_set(tmp_path, blocks((0, 1, 2, 0)))
    write_image(tmp_path / "images/train/y.jpg")
    write_mask(tmp_path / "masks/train/y.png", blocks((1, 1, 1, 1)))
    Path(tmp_path / "images/train/x.jpg").write_bytes(b"\xff\xd8 truncated")
    skipping = read_masks(tmp_path, "train", classes=["a", "b", "c"], on_bad_image="skip")
    assert skipping[0] == Skipped(str(tmp_path / "images/train/x.jpg")) and skipping.skipped == 1
    assert not isinstance(skipping[1], Skipped)
    with pytest.raises(BadImageError, match=r"x\.jpg"):
        ds[0]


def test_check_all_finds_every_problem(tmp_path):
    ds = bad_set(tmp_path, blocks((0, 9, 1, 0)))
    write_image(tmp_path / "images/train/y.jpg")
    write_mask(tmp_path / "masks/train/y.png", blocks((1, 1, 1, 1)))
    write_image(tmp_path / "images/train/z.jpg")
    write_mask(tmp_path / "masks/train/z.png", np.zeros((5, 5), np.uint8))
    ds = read_masks(tmp_path, "train", classes=["a", "b", "c"])
    problems = ds.check_all(raise_errors=False, workers=2)
    assert len(problems) == 2 and "x.png" in problems[0] and "9" in problems[0] and "z.png" in problems[1]
    with pytest.raises(BadAnnotationError, match="2 of 3 items cannot be read"):
        ds.check_all(workers=0)


# --- transforms ----------------------------------------------------------------------------------


def sample(labels: np.ndarray) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """An image coloured by ``PALETTE[label]`` (255: black) with its mask."""
    colours = np.where(labels[..., None] == 255, 0, PALETTE[np.minimum(labels, len(PALETTE) - 1)])
    image = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(colours.transpose(2, 0, 1))))
    return image, tv_tensors.Mask(torch.from_numpy(labels.astype(np.int64)))


def test_fit_size_is_mmcvs_rescale():
    assert fit_size(512, 683, (2048, 512)) == (512, 683)  # a typical ADE20K image is left as it is
    assert fit_size(512, 683, (2048, 512), 2.0) == (1024, 1366)
    assert fit_size(683, 512, (2048, 512), 0.5) == (342, 256)  # the short side binds: 256 / 512
    assert fit_size(300, 2000, (2048, 512)) == (307, 2048)  # the long side binds: 2048 / 2000
    assert fit_size(48, 64, (256, 64)) == (64, 85)  # int(64 * 4/3 + 0.5)


def test_train_transform_crops_pads_and_keeps_dtypes():
    image, mask = sample(blocks((0, 1, 2, 3), 30, 40))
    t = segmentation_transforms(True, crop_size=(64, 64), scale=(256, 64), ratio_range=(0.5, 0.5), photometric=False,
                                mean=None)  # fmt: skip
    out_image, out_mask = t(image, mask)
    # fit (128, 32): factor min(128/40, 32/30) = 16/15 -> 32 x 43, smaller than the crop: padded
    assert out_image.shape == (3, 64, 64) and out_image.dtype == torch.float32
    assert out_mask.shape == (64, 64) and out_mask.dtype == torch.int64
    assert 0 <= out_image.min() and out_image.max() <= 1
    assert (out_mask[32:] == 255).all() and (out_mask[:, 43:] == 255).all() and (out_mask[:32, :43] != 255).all()
    assert (out_image[:, 32:] == 0).all() and (out_image[:, :, 43:] == 0).all()
    big = segmentation_transforms(True, crop_size=(64, 64), scale=(256, 64))(image, mask)
    assert big[0].shape == (3, 64, 64) and big[1].shape == (64, 64)
    small = tv_tensors.Image(out_image[:, :32, :43]), tv_tensors.Mask(out_mask[:32, :43])
    fill = PadTo((64, 64), fill=[0.5, 0.25, 0.125])(*small)
    assert fill[0][:, 40, 50].tolist() == [0.5, 0.25, 0.125] and fill[1][40, 50] == 255


def test_random_scale_covers_the_ratio_range():
    resize = ResizeToFit((256, 64), (0.5, 2.0))
    image = tv_tensors.Image(torch.zeros(3, 64, 128, dtype=torch.uint8))  # fits (256, 64) as it is
    heights = [resize.make_params([image])["size"][0] for _ in range(400)]
    assert min(heights) < 36 and max(heights) > 120 and all(32 <= h <= 128 for h in heights)
    assert 60 < np.median(heights) < 100  # uniform in the ratio: median ratio 1.25


def dominated(mask: torch.Tensor, ratio: float = 0.75) -> bool:
    labels, counts = torch.unique(mask, return_counts=True)
    counts = counts[labels != 255]
    return len(counts) < 2 or counts.max() / counts.sum() >= ratio


def test_cat_max_ratio_avoids_crops_of_one_class():
    labels = np.zeros((64, 64), np.uint8)
    labels[:32, :32] = 1  # 64% of the 32 x 32 windows have one class on 75% or more of their labelled pixels
    labels[60:, :] = 255  # ignored pixels count for no class
    _, mask = sample(labels)
    share = {r: np.mean([dominated(SegRandomCrop(32, r)(mask)) for _ in range(300)]) for r in (1.0, 0.75)}
    assert share[1.0] > 0.5 and share[0.75] < 0.05, share  # 11 draws: 0.64 ** 11 < 1%
    whole = SegRandomCrop((100, 16), 0.75)(mask)  # taller than the image: its whole height
    assert whole.shape == (64, 16)


def agreement(image: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of interior labelled pixels (5 x 5 neighbourhood of one label) whose colour is their label's."""
    m = mask.as_subclass(torch.Tensor).float()[None, None]
    interior = (nnf.max_pool2d(m, 5, 1, 2) == -nnf.max_pool2d(-m, 5, 1, 2))[0, 0] & (mask != 255)
    pixels = (image * 255).round().permute(1, 2, 0)[interior]  # N, 3
    nearest = torch.cdist(pixels, torch.from_numpy(PALETTE).float()).argmin(1)
    return float((nearest == mask[interior]).float().mean())


def test_image_and_mask_stay_aligned_through_resize_crop_flip():
    labels = blocks((0, 1, 2, 3), 60, 80)
    labels[5:20, 50:75] = 4  # nothing is symmetric
    image, mask = sample(labels)
    t = segmentation_transforms(True, crop_size=(48, 48), scale=(128, 48), photometric=False, mean=None)
    for _ in range(12):
        out_image, out_mask = t(image, mask)
        assert agreement(out_image, out_mask) > 0.99
    assert agreement(out_image, out_mask.flip(-1)) < 0.8  # the check sees a misaligned pair
    # without a resize the correspondence is exact, pixel by pixel
    labels = torch.randint(0, 150, (48, 64), dtype=torch.uint8)
    image, mask = tv_tensors.Image(labels.expand(3, -1, -1).clone()), tv_tensors.Mask(labels.long())
    t = segmentation_transforms(True, crop_size=(32, 40), scale=(64, 48), ratio_range=(1.0, 1.0), photometric=False,
                                mean=None)  # fmt: skip
    for _ in range(8):
        out_image, out_mask = t(image, mask)
        assert torch.equal((out_image * 255).round().long(), out_mask.expand(3, -1, -1))


def test_eval_transform_resizes_the_image_only():
    image, mask = sample(blocks((0, 1, 2, 3), 48, 64))
    out_image, out_mask = segmentation_transforms(False, scale=(256, 64))(image, mask)
    assert out_image.shape == (3, 64, 85) and out_image.dtype == torch.float32
    assert out_mask.shape == (48, 64) and torch.equal(out_mask, mask)
    plain = segmentation_transforms(False, scale=(256, 64), mean=None)(image, mask)[0]
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(out_image, (plain - mean) / std, atol=1e-5)  # ImageNet normalisation, as the release


def test_training_pads_after_normalising_so_the_padding_is_the_mean_colour():
    image, mask = sample(blocks((0, 1, 2, 3), 30, 40))
    out_image, out_mask = segmentation_transforms(True, crop_size=(64, 64), scale=(256, 64), ratio_range=(0.5, 0.5),
                                                  photometric=False)(image, mask)  # fmt: skip
    assert (out_image[:, 32:] == 0).all() and (out_mask[32:] == 255).all()  # mmseg: Normalize, then Pad with 0
    assert out_image[:, :32, :43].min() < -1  # normalised values


def test_photometric_distortion_is_mmsegs():
    image, mask = sample(blocks((0, 1, 2, 3)))
    pd = PhotoMetricDistortion()
    none = {"brightness": None, "contrast": None, "contrast_first": False, "saturation": None, "hue": None}
    up = pd.transform(image, {**none, "brightness": 40.7})  # additive, clipped, truncated
    assert torch.equal(up, (image.int() + 40).clamp(0, 255).to(torch.uint8)) and isinstance(up, tv_tensors.Image)
    scaled = pd.transform(image, {**none, "contrast": 1.5})  # a plain product, no blend with the mean
    assert torch.equal(scaled, (image.float() * 1.5).clamp(0, 255).to(torch.uint8))
    for factor in (0.5, 1.4):  # HSV saturation scaled, hue and value kept
        out = pd.transform(image, {**none, "saturation": factor})[:, 0, 0].tolist()
        h, s, v = colorsys.rgb_to_hsv(*(image[:, 0, 0].float() / 255).tolist())
        expected = [255 * c for c in colorsys.hsv_to_rgb(h, min(s * factor, 1.0), v)]
        assert max(abs(a - b) for a, b in zip(out, expected)) <= 1
    assert pd(image, mask)[1] is mask  # masks pass through
    unchanged = np.mean([torch.equal(pd(image), image) for _ in range(200)])
    assert 0.02 < unchanged < 0.15  # each of the four steps at probability 0.5: 1/16 of calls change nothing
    hues = {round((pd.make_params([image])["hue"] or 0.0) * 180) for _ in range(400)}
    assert min(hues) == -18 and max(hues) == 17  # randint(-18, 18) in OpenCV's half degrees, as numpy's
    as_float = pd(image.float() / 255)
    assert as_float.dtype == torch.float32 and 0 <= as_float.min() and as_float.max() <= 1


def test_transforms_pickle_for_workers():
    t = pickle.loads(pickle.dumps(segmentation_transforms(True, crop_size=(32, 32), scale=(128, 32))))
    out_image, out_mask = t(*sample(blocks((0, 1, 2, 3))))
    assert out_image.shape == (3, 32, 32) and out_mask.shape == (32, 32)


def test_collate_stacks_equal_sizes_and_drops_skipped():
    a, b = sample(blocks((0, 1, 2, 3))), sample(blocks((3, 2, 1, 0)))
    batch = collate_segmentation([a, Skipped("x.jpg"), (*b, "b.jpg")])
    assert batch["images"].shape == (2, 3, H, W) and batch["masks"].shape == (2, H, W)
    assert batch["masks"].dtype == torch.int64 and batch["paths"] == ["", "b.jpg"] and batch["skipped"] == ["x.jpg"]
    c = sample(blocks((0, 0, 1, 1), 16, 16))
    mixed = collate_segmentation([{"image": c[0], "mask": c[1], "path": "c.png"}, a])
    assert isinstance(mixed["images"], list) and [m.shape for m in mixed["masks"]] == [(16, 16), (H, W)]
    assert mixed["paths"] == ["c.png", ""] and mixed["skipped"] == []
    assert collate_segmentation([Skipped("x.jpg")])["skipped"] == ["x.jpg"]
