"""A small generated segmentation set in ADE20K's layout: coloured shapes whose index PNG marks them.

``ADEChallengeData2016/images/{training,validation}/*.jpg`` and ``annotations/.../*.png`` with label 0
("other", the background noise) and labels 1..3 for the three shapes, so that after ADE20K's
zero-label reduction the classes are 0..2 and the background is ignored (255).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("square", "disc", "triangle")
COLOURS = ((230, 40, 40), (40, 220, 60), (50, 80, 240))


def _draw(draw: ImageDraw.ImageDraw, kind: int, box: tuple[int, int, int, int], fill) -> None:
    x1, y1, x2, y2 = box
    if kind == 0:
        draw.rectangle(box, fill=fill)
    elif kind == 1:
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)


def write_ade(root: Path, *, n_train: int = 4, n_val: int = 3, size: tuple[int, int] = (96, 72)) -> Path:
    """Write the set under ``root/ADEChallengeData2016``; returns ``root``."""
    rng = np.random.default_rng(0)
    width, height = size
    for split, n in (("training", n_train), ("validation", n_val)):
        images = root / "ADEChallengeData2016" / "images" / split
        labels = root / "ADEChallengeData2016" / "annotations" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = Image.fromarray(rng.integers(60, 110, (height, width, 3), dtype=np.uint8))
            mask = Image.new("L", size, 0)
            for kind in range(3):
                w, h = (int(v) for v in rng.integers(18, 34, 2))
                x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
                _draw(ImageDraw.Draw(image), kind, (x, y, x + w, y + h), COLOURS[kind])
                _draw(ImageDraw.Draw(mask), kind, (x, y, x + w, y + h), kind + 1)
            name = f"ADE_{split[:5]}_{i:08d}"
            image.save(images / f"{name}.jpg", quality=95)
            mask.save(labels / f"{name}.png")
    return root
