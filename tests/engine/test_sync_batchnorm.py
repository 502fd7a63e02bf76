"""``trainer.sync_batchnorm: true`` (the dense paper configs, for the release's SyncBN heads) on one device.

Lightning converts BatchNorm to SyncBatchNorm only under a multi-process strategy; on one device the flag must
change nothing: same strategy, same layers, the same weights after training, bit for bit.
"""
import lightning as L
import torch
from shapes_segmentation import CLASSES, write_ade
from torch import nn

from monatune.data import SegmentationData
from monatune.tasks import SemanticSegmenter

SWIN = {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "window_size": 4}


def fit(root, sync_batchnorm: bool) -> tuple[L.Trainer, SemanticSegmenter]:
    L.seed_everything(0)
    data = SegmentationData(str(root), batch_size=2, num_workers=0, crop_size=(48, 48), scale=(128, 48),
                            ratio_range=(1.0, 1.0), cat_max_ratio=1.0, hflip=False, photometric=False,
                            classes=list(CLASSES))  # fmt: skip
    model = SemanticSegmenter("swin_tiny_patch4_window7_224", model_kwargs=SWIN, method="mona", lr=1e-3,
                              channels=16, aux_channels=8)  # fmt: skip
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, sync_batchnorm=sync_batchnorm, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False)  # fmt: skip
    trainer.fit(model, data)
    return trainer, model


def test_sync_batchnorm_is_harmless_on_one_device(tmp_path):
    root = write_ade(tmp_path / "ade", n_train=4, n_val=1)
    trainer, synced = fit(root, sync_batchnorm=True)
    _, plain = fit(root, sync_batchnorm=False)
    assert type(trainer.strategy).__name__ == "SingleDeviceStrategy"
    norms = [m for m in synced.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)  # not converted to SyncBatchNorm
    assert any(int(m.num_batches_tracked) == 3 for m in norms)  # the heads' BatchNorms trained
    for (name, a), (_, b) in zip(synced.model.state_dict().items(), plain.model.state_dict().items()):
        assert torch.equal(a, b), name
