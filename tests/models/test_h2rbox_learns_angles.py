"""H2RBox-v2+ learns rotated boxes from horizontal-box labels only (the issue's learning check).

A tiny Swin (windows of 4) is trained from scratch on generated scenes, each a bar (w:h about 4:1) at
a random angle on noise, a fresh batch each step, with only the bar's circumscribed horizontal box as
its label; the learning rate falls to zero on a cosine. On held-out scenes the predicted angle must be
far closer to the truth than a constant prediction's. About 80 s alone on one thread.

A learning check this small is noisy: the angle is learned only through the self-supervised views, and
its offset is pinned only by the flipped ones (5% of batches, as the release). Seen with this set-up
(scene generator seed 2): 22 degrees against the constant's 39 from step 100 to 200, with one thread
and with two (the check does not hang on the exact sums); generator seed 1: 27 against 41 (passes
narrowly). With a fixed set of 64 training scenes and no schedule, some seeds learned the angle by step
100 and lost it by step 300.
"""
import math

import torch
from oriented_data import bar_scene

from monatune.models.oriented import build_h2rbox
from monatune.ops import cxcywhr_to_le90, le90_to_cxcywhr, le90_to_hbb


def angle_error(a: float, b: float) -> float:
    d = abs(a - b) % math.pi
    return min(d, math.pi - d)


def test_h2rbox_learns_angles_from_horizontal_boxes():
    # one thread whatever the test workers: the same sums everywhere, and no waiting on a busy second core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _learn_and_check()
    finally:
        torch.set_num_threads(threads)


def _learn_and_check():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    held_out = [bar_scene(g) for _ in range(32)]
    swin = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4)
    model = build_h2rbox("swin_tiny_patch4_window7_224", num_classes=1, method="full", fpn_channels=64,
                         score_threshold=0.0, model_kwargs=swin)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    steps = 200
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(steps):
        batch = [bar_scene(g) for _ in range(4)]
        targets = [{"boxes": le90_to_hbb(truth), "labels": torch.tensor([1])} for _, truth in batch]
        assert all(min(abs(t["boxes"][0, 4].item() - a) for a in (0.0, -math.pi / 2)) < 1e-6 for t in targets)  # horizontal boxes only
        loss = sum(model([image for image, _ in batch], targets).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 35)
        optimizer.step()
        schedule.step()
    model.eval()
    errors, truths = [], []
    with torch.no_grad():
        for image, truth in held_out:
            found = model([image])[0]["boxes"][:1]
            assert len(found), "no detection on a held-out scene"
            best = cxcywhr_to_le90(le90_to_cxcywhr(found))[0]  # w >= h, as the truth
            errors.append(angle_error(best[4].item(), truth[0, 4].item()))
            truths.append(truth[0, 4].item())
    mean = sum(errors) / len(errors)
    # the best a constant angle could do on these scenes (any constant, in 1-degree steps)
    baseline = min(sum(angle_error(math.radians(c), t) for t in truths) / len(truths) for c in range(-90, 90))
    print(f"mean angle error {math.degrees(mean):.1f} deg, best constant {math.degrees(baseline):.1f} deg")
    # seen: 22 degrees against 39 for the best constant
    assert mean < 0.7 * baseline, f"mean angle error {math.degrees(mean):.1f} deg vs constant {math.degrees(baseline):.1f}"
