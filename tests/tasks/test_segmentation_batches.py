"""Semantic segmentation never trains on a batch of one image, which BatchNorm cannot normalise:
an epoch's incomplete last batch is left out, a batch size of 1 is refused, and a batch that
``on_bad_image=skip`` left with one image trains as that image twice."""
import warnings

import lightning as L
import pytest
from shapes_segmentation import CLASSES, write_ade

from monatune.data import SegmentationData
from monatune.tasks import SemanticSegmenter

BATCH = 2
SWIN = ("swin_tiny_patch4_window7_224", {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8],
                                         "window_size": 4})  # fmt: skip


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory):
    """Five training images: two full batches of 2 and one image left over."""
    return write_ade(tmp_path_factory.mktemp("odd") / "ade", n_train=2 * BATCH + 1, n_val=2)


def data_module(root, **kwargs):
    options = dict(batch_size=BATCH, num_workers=0, crop_size=(48, 48), scale=(128, 48), ratio_range=(1.0, 1.0),
                   cat_max_ratio=1.0, hflip=False, photometric=False, classes=list(CLASSES))  # fmt: skip
    return SegmentationData(str(root), **{**options, **kwargs})


def fit(data, epochs: int = 2) -> L.Trainer:
    L.seed_everything(0)
    model = SemanticSegmenter(SWIN[0], model_kwargs=SWIN[1], method="mona", method_options={"bottleneck": 8},
                              lr=1e-3, channels=32, aux_channels=16)  # fmt: skip
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)  # fmt: skip
    trainer.fit(model, data)
    return trainer


def paths_of(loader) -> list[list[str]]:
    return [batch["paths"] for batch in loader]


def test_training_batches_are_full_and_resume_exactly(odd_root):
    loader = data_module(odd_root).train_dataloader()
    assert len(loader) == 2
    whole = paths_of(loader)
    assert [len(p) for p in whole] == [BATCH, BATCH] and len({p for b in whole for p in b}) == 2 * BATCH
    state = None
    for batch in loader:  # interrupted after its first batch, then restored into a new loader
        state = loader.state_dict()
        break
    resumed = data_module(odd_root).train_dataloader()
    resumed.load_state_dict(state)
    assert paths_of(resumed) == whole[1:]
    # the next epoch reshuffles, so another image is left out
    loader.sampler.set_epoch(1)
    assert paths_of(loader) != whole


def test_training_set_one_more_than_a_multiple_of_the_batch_trains(odd_root):
    trainer = fit(data_module(odd_root))
    assert trainer.global_step == 2 * 2  # two full batches per epoch


def test_training_set_smaller_than_a_batch_is_refused(tmp_path):
    root = write_ade(tmp_path / "ade", n_train=1, n_val=1)
    with pytest.raises(ValueError, match=r"1 images, 1 per process .*fewer than one full batch \(data.batch_size=2\)"):
        data_module(root).train_dataloader()


def test_batch_size_1_is_refused_naming_the_setting(odd_root):
    with pytest.raises(ValueError, match=r"at least 2 images per batch .* set data.batch_size to 2 or more"):
        fit(data_module(odd_root, batch_size=1), epochs=1)


def test_a_batch_left_with_one_image_by_skip_trains(tmp_path):
    root = write_ade(tmp_path / "ade", n_train=2 * BATCH, n_val=1)
    bad = root / "ADEChallengeData2016" / "images" / "training" / "ADE_train_00000001.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(data_module(root, on_bad_image="skip"))
    assert trainer.global_step == 2 * 2
    lone = [str(w.message) for w in caught if "left a training batch with one image" in str(w.message)]
    assert len(lone) == 1 and "ADE_train_" in lone[0]
