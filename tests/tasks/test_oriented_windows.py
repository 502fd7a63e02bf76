"""Sliding windows and the merges of oriented detection (monatune.tasks.oriented_windows)."""
import math

import numpy as np
import pytest
import torch

from monatune.tasks.oriented_windows import (
    WINDOW_PAD_RGB,
    detect_full_image,
    merge_patches,
    patch_origin,
    sliding_windows,
)


def test_sliding_windows_hand_computed():
    # 2000 x 1500: x starts 0, 824, then 1648 + 1024 > 2000 moves back to 976; y starts 0, then 476
    w = sliding_windows(2000, 1500, 1024, 200, 0.6)
    starts = sorted({(int(a), int(b)) for a, b in w[:, :2]})
    assert starts == [(0, 0), (0, 476), (824, 0), (824, 476), (976, 0), (976, 476)]
    assert (w[:, 2:] - w[:, :2] == 1024).all()
    assert [tuple(r[:2]) for r in w[:2]] == [(0, 0), (0, 476)]  # x-major, as the release's itertools.product


def test_small_image_keeps_its_best_window():
    # a 300 x 200 image fills 5.7% of the one 1024 window: none passes 0.6, the best is kept
    w = sliding_windows(300, 200, 1024, 200, 0.6)
    assert w.tolist() == [[0, 0, 1024, 1024]]


def test_bad_gap_is_refused():
    with pytest.raises(ValueError, match="gap"):
        sliding_windows(100, 100, 64, 64)


def test_patch_origin():
    assert patch_origin("P0003__1024__824___0") == ("P0003", 824, 0)
    assert patch_origin("P0003__0.5__1648___412") == ("P0003", 1648, 412)
    assert patch_origin("scene") == ("scene", 0, 0)


def det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 5), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def test_merge_puts_a_box_cut_by_two_patches_back_as_one():
    # one object at (1000, 300), 200 x 40 at 30 degrees, seen by the patches at x 0 and x 824
    a = det([[1000.0, 300.0, 200.0, 40.0, math.radians(30)]], [0.9], [2])
    b = det([[1000.0 - 824 + 1.0, 300.0, 198.0, 40.0, math.radians(31)]], [0.8], [2])
    other = det([[50.0, 50.0, 30.0, 10.0, 0.0]], [0.5], [1])  # another class, elsewhere
    merged = merge_patches([("P1__1024__0___0", a), ("P1__1024__824___0", b), ("P2__1024__0___0", other)], 0.1)
    assert set(merged) == {"P1", "P2"}
    assert len(merged["P1"]["boxes"]) == 1 and merged["P1"]["scores"].tolist() == pytest.approx([0.9])
    assert merged["P1"]["boxes"][0, 0].item() == pytest.approx(1000.0)
    # the same overlap in two classes is kept twice (per-class merge)
    c = det([[1000.0 - 824, 300.0, 200.0, 40.0, math.radians(30)]], [0.8], [3])
    assert len(merge_patches([("P1__1024__0___0", a), ("P1__1024__824___0", c)], 0.1)["P1"]["boxes"]) == 2


class FakeImage:
    """A LargeImage stand-in over an array, recording the regions read."""

    def __init__(self, array):
        self.array, self.reads = array, []

    @property
    def size(self):
        return self.array.shape[1], self.array.shape[0]

    def read(self, x1, y1, x2, y2):
        self.reads.append((x1, y1, x2, y2))
        return self.array[y1:y2, x1:x2]


def test_full_image_windows_pixels_offsets_and_class_agnostic_merge():
    h, w = 150, 230  # padded to 192 x 256 by 64; windows of 128 with gap 32 (step 96)
    array = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    image = FakeImage(array)
    seen = []

    def detect(windows):
        out = []
        for win in windows:
            seen.append(win.clone())
            # every window reports the same scene object (global centre 120, 90) in its own pixels,
            # with a different class each time: the merge is class-agnostic, so one survives
            k = len(seen)
            x0, y0 = starts[k - 1]
            out.append(det([[120.0 - x0, 90.0 - y0, 60.0, 20.0, 0.2]], [0.5 + 0.01 * k], [k % 3 + 1]))
        return out

    padded = (256, 192)
    wins = sliding_windows(*padded, size=128, gap=32, rate_threshold=0.6)
    starts = [tuple(int(v) for v in wins[k][:2]) for k in sorted(range(len(wins)), key=lambda k: (wins[k][1], wins[k][0]))]
    result = detect_full_image(detect, image, size=128, gap=32, batch=3, merge_iou=0.4, pad_divisor=64)
    assert len(seen) == len(wins)
    assert len(result["boxes"]) == 1
    assert result["boxes"][0, :2].tolist() == pytest.approx([120.0, 90.0])
    assert result["scores"].item() == pytest.approx(0.5 + 0.01 * len(wins))
    # pixels: the image where it is, the mean colour over the 64-padding, the release's colour beyond it
    first = seen[0]  # window at (0, 0)
    assert torch.allclose(first[:, :100, :100], torch.from_numpy(array[:100, :100]).permute(2, 0, 1).float() / 255)
    last = seen[-1]
    x0, y0 = starts[-1]
    assert x0 + 128 > w and y0 + 128 > h
    inside_pad = last[:, h - y0, w - x0]  # just outside the image, inside the 64-padding
    assert inside_pad.tolist() == pytest.approx([123.675 / 255, 116.28 / 255, 103.53 / 255])
    # the reads never go past the image
    assert all(x2 <= w and y2 <= h for _, _, x2, y2 in image.reads)


def test_window_padding_beyond_the_padded_image():
    array = np.zeros((40, 50, 3), np.uint8)
    seen = []
    detect_full_image(lambda ws: [seen.extend(ws) or det([], [], []) for _ in ws], FakeImage(array), size=128, gap=32,
                      pad_divisor=64)  # fmt: skip
    win = seen[0]
    assert win[:, 70, 70].tolist() == pytest.approx([v / 255 for v in WINDOW_PAD_RGB])
    assert win[:, 50, 60].tolist() == pytest.approx([123.675 / 255, 116.28 / 255, 103.53 / 255])
    assert win[:, 10, 10].tolist() == [0.0, 0.0, 0.0]


def test_two_stage_merge_is_per_class_over_all_windows():
    # Oriented R-CNN's merge_results_two_stage: no merge inside a window, one per-class NMS over all windows
    array = np.zeros((150, 230, 3), np.uint8)
    wins = sliding_windows(256, 192, size=128, gap=32, rate_threshold=0.6)
    order = sorted(range(len(wins)), key=lambda k: (wins[k][1], wins[k][0]))
    calls = []

    def detect(windows):
        out = []
        for _ in windows:
            x0, y0 = (int(v) for v in wins[order[len(calls)]][:2])
            calls.append((x0, y0))
            # each window: the same object twice, as class 1 and class 2, and a near copy of class 1
            out.append(det([[120.0 - x0, 90.0 - y0, 60.0, 20.0, 0.2], [120.0 - x0, 90.0 - y0, 60.0, 20.0, 0.2],
                            [121.0 - x0, 90.0 - y0, 60.0, 20.0, 0.2]], [0.9, 0.6, 0.3], [1, 2, 1]))  # fmt: skip
        return out

    per_class = detect_full_image(detect, FakeImage(array), size=128, gap=32, batch=2, merge_iou=0.4, pad_divisor=64,
                                  per_class=True)  # fmt: skip
    assert sorted(per_class["labels"].tolist()) == [1, 2]  # one survivor per class over all windows
    assert per_class["boxes"][:, :2].flatten().tolist() == pytest.approx([120.0, 90.0] * 2)
    calls.clear()
    agnostic = detect_full_image(detect, FakeImage(array), size=128, gap=32, batch=2, merge_iou=0.4, pad_divisor=64)
    assert agnostic["labels"].tolist() == [1]  # the single-stage merge keeps one box whatever its class
