"""Generated DOTA / STAR layout folders (imported by name: ``from oriented_data import write_oriented_folder``).

Each image is noise with filled rotated rectangles drawn at known angles; each rectangle's 4 corners
(clockwise on screen, as DOTA lists them) go in the image's ``.txt`` with its class and difficult flag.
"""
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = [(230, 60, 40), (40, 200, 80), (50, 90, 230), (230, 210, 40), (200, 60, 220)]


def corners(cx, cy, w, h, theta):
    """The le90 box's corners, clockwise on screen (theta in radians, clockwise)."""
    u, v = (math.cos(theta), math.sin(theta)), (-math.sin(theta), math.cos(theta))
    signs = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    return [(cx + a * w / 2 * u[0] + b * h / 2 * v[0], cy + a * w / 2 * u[1] + b * h / 2 * v[1]) for a, b in signs]


def write_oriented_folder(root, n_images, size=(96, 96), classes=("plane", "ship"), *, seed=0, layout="annfiles",
                          header=False, objects=(1, 3), names=None):  # fmt: skip
    """Write ``root/images/*.png`` and ``root/<layout>/*.txt``; returns ``root``.

    ``layout=None`` writes images only (a test split without annotations); ``size`` is (W, H).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    if layout:
        (root / layout).mkdir(parents=True, exist_ok=True)
    W, H = size
    for i in range(n_images):
        stem = names[i] if names else f"P{i:04d}"
        image = Image.fromarray(rng.integers(0, 90, (H, W, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        lines = ["imagesource:GoogleEarth", "gsd:0.146"] if header else []
        for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
            k = int(rng.integers(len(classes)))
            w, h = float(rng.uniform(0.25, 0.4) * min(W, H)), float(rng.uniform(0.08, 0.14) * min(W, H))
            cx, cy = float(rng.uniform(0.3, 0.7) * W), float(rng.uniform(0.3, 0.7) * H)
            theta = float(rng.uniform(-math.pi / 2, math.pi / 2))
            pts = corners(cx, cy, w, h, theta)
            draw.polygon(pts, fill=COLOURS[k % len(COLOURS)])
            lines.append(" ".join(f"{v:.1f}" for p in pts for v in p) + f" {classes[k]} 0")
        image.save(root / "images" / f"{stem}.png")
        if layout:
            (root / layout / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return root


def bar_scene(g, size=64, *, w=0.45, h=0.12):
    """A ``[3, size, size]`` float image (noise in 0..0.3) with one bar (w:h of the side, about 4:1) at a random
    angle near the centre, and its le90 box ``[[cx, cy, w, h, theta]]``; ``g`` is a torch.Generator."""
    image = torch.rand(3, size, size, generator=g) * 0.3
    cx, cy = (size / 2 + (torch.rand(2, generator=g) - 0.5) * size * 0.2).tolist()
    theta = (torch.rand(1, generator=g).item() - 0.5) * math.pi  # le90: [-pi/2, pi/2)
    w, h = size * w, size * h
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    u = (xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta)
    v = -(xs - cx) * math.sin(theta) + (ys - cy) * math.cos(theta)
    inside = (u.abs() < w / 2) & (v.abs() < h / 2)
    for c, value in enumerate((0.9, 0.6, 0.2)):
        image[c][inside] = value
    return image, torch.tensor([[cx, cy, w, h, theta]])
