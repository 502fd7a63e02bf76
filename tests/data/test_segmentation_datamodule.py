"""SegmentationData: layouts, loaders, and the errors a wrong setup gets."""
import numpy as np
import pytest
import torch
from PIL import Image
from shapes_segmentation import CLASSES, write_ade

from monatune.data import ADE20K_CLASSES, BadAnnotationError, SegmentationData


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    return write_ade(tmp_path_factory.mktemp("seg") / "ade", n_train=4, n_val=3)


def small(root, **kwargs):
    return SegmentationData(str(root), **{"batch_size": 2, "num_workers": 0, "crop_size": (32, 32), "scale": (128, 48),
                                          **kwargs})  # fmt: skip


def test_ade20k_layout_loaders(ade_root):
    data = small(ade_root)
    assert data.classes == list(ADE20K_CLASSES) and data.num_classes == 150 and data.crop_size == (32, 32)
    assert data.test_set is data.val_set  # validation doubles as the test split
    batch = next(iter(data.train_dataloader()))
    assert batch["images"].shape == (2, 3, 32, 32) and batch["masks"].shape == (2, 32, 32)
    assert batch["masks"].dtype == torch.int64 and set(batch["masks"].unique().tolist()) <= {0, 1, 2, 255}
    val = next(iter(data.val_dataloader()))
    assert [tuple(m.shape) for m in val["masks"]] == [(72, 96)] * 2  # masks keep the original size
    assert [tuple(i.shape[-2:]) for i in val["images"]] == [(48, 64)] * 2  # images fit 128 x 48
    with Image.open(val["paths"][0].replace("images", "annotations").replace(".jpg", ".png")) as m:
        raw = torch.from_numpy(np.asarray(m).astype(np.int64))
    assert torch.equal(val["masks"][0], torch.where(raw == 0, 255, raw - 1))  # ADE20K's zero-label reduction


def test_masks_layout_with_a_class_file(ade_root, tmp_path):
    root = tmp_path / "plain"
    for split, ade in (("train", "training"), ("val", "validation")):
        for kind, src in (("images", "images"), ("masks", "annotations")):
            (root / kind / split).mkdir(parents=True)
            for f in (ade_root / "ADEChallengeData2016" / src / ade).iterdir():
                (root / kind / split / f.name).write_bytes(f.read_bytes())
    (root / "classes.txt").write_text("other\n" + "\n".join(CLASSES) + "\n")
    data = small(root, format="masks", classes=str(root / "classes.txt"))
    assert data.classes == ["other", *CLASSES] and data.num_classes == 4
    assert set(next(iter(data.val_dataloader()))["masks"][0].unique().tolist()) <= {0, 1, 2, 3}
    reduced = small(root, format="masks", classes=list(CLASSES), reduce_zero_label=True)
    assert set(next(iter(reduced.val_dataloader()))["masks"][0].unique().tolist()) <= {0, 1, 2, 255}


def test_bad_setups_are_refused(ade_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder '.*nowhere' does not exist"):
        small(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown segmentation format 'voc'"):
        small(ade_root, format="voc")
    with pytest.raises(ValueError, match="format 'masks' needs `classes`"):
        small(ade_root, format="masks")
    with pytest.raises(ValueError, match="three names"):
        small(ade_root, splits=("training", "validation"))
    with pytest.raises(ValueError, match="batch_size"):
        small(ade_root, batch_size=0)


def test_a_mask_with_labels_beyond_the_classes_names_its_file(ade_root):
    data = small(ade_root, classes=["square", "disc"])  # the set has three shapes
    with pytest.raises(BadAnnotationError, match=r"ADE_valid_00000000\.png"):
        next(iter(data.val_dataloader()))
    with pytest.raises(BadAnnotationError, match=r"ADE_"):
        small(ade_root, classes=["square", "disc"], check_masks=True)  # all masks read up front
