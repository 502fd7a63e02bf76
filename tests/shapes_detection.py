"""A small generated detection set: coloured shapes on noise, written as COCO (JPEG + JSON) or VOC (JPEG + XML).

Three classes, each with its own shape and colour: ``square`` (red box), ``disc`` (green ellipse),
``triangle`` (blue). Every object's mask is its exact polygon, so boxes and masks agree.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("square", "disc", "triangle")
COLOURS = {"square": (230, 40, 40), "disc": (40, 220, 60), "triangle": (50, 80, 240)}


def _polygon(kind: str, x: float, y: float, w: float, h: float) -> list[tuple[float, float]]:
    if kind == "square":
        return [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    if kind == "triangle":
        return [(x + w / 2, y), (x + w, y + h), (x, y + h)]
    return [(x + w / 2 + w / 2 * math.cos(a), y + h / 2 + h / 2 * math.sin(a))
            for a in np.linspace(0, 2 * math.pi, 24, endpoint=False)]  # fmt: skip


def make_images(n: int, *, size: tuple[int, int] = (128, 96), seed: int = 0, max_objects: int = 3) -> list[dict]:
    """``n`` pictures: ``{"image": PIL, "objects": [(class name, polygon, (x1, y1, x2, y2))]}``."""
    rng = np.random.default_rng(seed)
    width, height = size
    out = []
    for _ in range(n):
        pixels = rng.integers(60, 110, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        objects = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            kind = CLASSES[int(rng.integers(len(CLASSES)))]
            w, h = (int(v) for v in rng.integers(20, 44, 2))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            poly = _polygon(kind, x, y, w, h)
            draw.polygon(poly, fill=COLOURS[kind])
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            objects.append((kind, poly, (min(xs), min(ys), max(xs), max(ys))))
        out.append({"image": image, "objects": objects})
    return out


def write_coco_split(root: Path, split: str, n: int, *, seed: int, size: tuple[int, int] = (128, 96)) -> Path:
    """``root/<split>/*.jpg`` and ``root/annotations/instances_<split>.json``; returns the JSON file."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, item in enumerate(make_images(n, size=size, seed=seed), 1):
        name = f"{split}_{i:04d}.jpg"
        item["image"].save(root / split / name, quality=95)
        images.append({"id": i, "file_name": name, "width": size[0], "height": size[1]})
        for kind, poly, (x1, y1, x2, y2) in item["objects"]:
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": CLASSES.index(kind) + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                "segmentation": [[round(c, 2) for point in poly for c in point]],
            })  # fmt: skip
    categories = [{"id": k, "name": name} for k, name in enumerate(CLASSES, 1)]
    json_file = root / "annotations" / f"instances_{split}.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return json_file


def write_coco(root: Path, *, n_train: int = 8, n_val: int = 4, size: tuple[int, int] = (128, 96)) -> Path:
    """A COCO-layout set with ``train`` and ``val`` splits under ``root``."""
    write_coco_split(root, "train", n_train, seed=1, size=size)
    write_coco_split(root, "val", n_val, seed=2, size=size)
    return root


def write_voc(root: Path, *, n_train: int = 8, n_test: int = 4, size: tuple[int, int] = (128, 96)) -> Path:
    """``root/VOCdevkit/VOC2007`` with ``trainval`` and ``test`` image sets; the last object of every
    test image with two or more objects is marked difficult."""
    base = root / "VOCdevkit" / "VOC2007"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for image_set, n, seed in (("trainval", n_train, 1), ("test", n_test, 2)):
        names = []
        for i, item in enumerate(make_images(n, size=size, seed=seed)):
            name = f"{image_set}_{i:04d}"
            names.append(name)
            item["image"].save(base / "JPEGImages" / f"{name}.jpg", quality=95)
            parts = [f"<annotation><filename>{name}.jpg</filename><size><width>{size[0]}</width>"
                     f"<height>{size[1]}</height><depth>3</depth></size>"]  # fmt: skip
            for k, (kind, _, (x1, y1, x2, y2)) in enumerate(item["objects"]):
                difficult = int(image_set == "test" and k == len(item["objects"]) - 1 > 0)
                box = (round(x1) + 1, round(y1) + 1, round(x2), round(y2))  # VOC: 1-based inclusive pixels
                parts.append(f"<object><name>{kind}</name><difficult>{difficult}</difficult><bndbox>"
                             + "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
                             + "</bndbox></object>")  # fmt: skip
            (base / "Annotations" / f"{name}.xml").write_text("".join(parts) + "</annotation>")
        (base / "ImageSets" / "Main" / f"{image_set}.txt").write_text("\n".join(names) + "\n")
    return root
