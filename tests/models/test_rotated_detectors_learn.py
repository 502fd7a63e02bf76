"""Oriented R-CNN and the rotated RetinaNet (L1 and KLD) learn from rotated boxes (the issue's learning check).

A tiny Swin detector is trained from scratch on generated 64 x 64 scenes, each a bar (38 x 16 px) at
a random angle on noise labelled with its rotated box, and its rotated mAP@0.5 on held-out scenes must
rise clearly above the untrained model's. To keep it quick, Oriented R-CNN's box head is 256 wide and
samples 128 RoIs per image (the release: 1024 and 512; both are tested in test_oriented_rcnn.py).
"""
import pytest
import torch
from oriented_data import bar_scene

from monatune.metrics.rotated import RotatedMeanAveragePrecision

SWIN = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))


def build(detector):
    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

    from monatune.models import oriented
    from monatune.models.oriented.rotated_roi_head import RotatedBoxHead

    common = dict(num_classes=1, method="full", fpn_channels=64, model_kwargs=SWIN, score_threshold=0.0)
    if detector == "oriented_rcnn":
        model = oriented.build_oriented_rcnn("swin_tiny_patch4_window7_224", **common)
        model.roi_head.box_head = RotatedBoxHead(64, 1, fc_channels=256)
        model.roi_head.sampler = BalancedPositiveNegativeSampler(128, 0.25)
        return model
    loss, hbb = ("kld", False) if detector.endswith("kld") else ("l1", True)
    return oriented.build_rotated_retinanet("swin_tiny_patch4_window7_224", box_loss=loss, assign_by_circumhbbox=hbb,
                                            **common)  # fmt: skip


def rotated_map(model, scenes):
    metric = RotatedMeanAveragePrecision(1)
    model.eval()
    with torch.no_grad():
        for image, truth in scenes:
            metric.update(model([image]), [{"boxes": truth, "labels": torch.tensor([1])}])
    return float(metric.compute()["map"])


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# the RetinaNets: L1 with the hbb assignment, KLD with the rotated one (the other pairs are the configs' variants)
@pytest.mark.parametrize("detector, steps", [("oriented_rcnn", 100), ("rotated_retinanet_hbb", 130), ("rotated_retinanet_kld", 160)])
def test_detector_learns_rotated_boxes(detector, steps):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    train, held_out = [bar_scene(g, w=0.6, h=0.25) for _ in range(48)], [bar_scene(g, w=0.6, h=0.25) for _ in range(16)]
    model = build(detector)
    before = rotated_map(model, held_out)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    for _ in range(steps):
        model.train()
        picked = torch.randint(len(train), (4,)).tolist()
        targets = [{"boxes": train[i][1], "labels": torch.tensor([1])} for i in picked]
        loss = sum(model([train[i][0] for i in picked], targets).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 35)
        optimizer.step()
    after = rotated_map(model, held_out)
    print(f"{detector}: rotated mAP@0.5 {before:.3f} -> {after:.3f}")
    assert after > before + 0.3, f"rotated mAP@0.5 {before:.3f} untrained -> {after:.3f} after {steps} steps"
