"""Whole-scene oriented detection by sliding windows: time per megapixel and peak memory (CPU).

Writes a W x H PNG scene (noise with rectangles), then runs ``detect_full_image`` with an untrained
H2RBox-v2+ (Mona) on a tiny Swin or Swin-B, 1024 windows with a 200 gap, batches of 4, as the STAR
config. Peak memory is the process's maximum resident set (``ru_maxrss``) growth over the model's
build (the scene is written by a child process), so it counts decoded pixels, windows and
activations, not the model's weights.

    python benchmarks/sliding_windows.py --backbone tiny --size 10000
    python benchmarks/sliding_windows.py --backbone swin_b --size 2048
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from monatune.data.large_images import LargeImage
from monatune.models.oriented import build_h2rbox
from monatune.tasks.oriented_windows import detect_full_image, sliding_windows

BACKBONES = {
    "tiny": dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),
    "swin_b": dict(),  # swin_base_patch4_window7_224 as it is
}


def scene(path: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    band = rng.integers(0, 90, (256, size, 3), dtype=np.uint8)
    image = Image.fromarray(np.tile(band, (size // 256 + 1, 1, 1))[:size])
    draw = ImageDraw.Draw(image)
    for _ in range(size // 50):
        x, y = rng.integers(0, size - 60, 2)
        draw.rectangle([int(x), int(y), int(x) + 50, int(y) + 15], fill=(220, 80, 40))
    image.save(path, compress_level=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="tiny")
    parser.add_argument("--size", type=int, default=10000, help="scene side in pixels")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--write-scene", metavar="PNG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_scene:
        scene(Path(args.write_scene), args.size)
        return
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scene.png"
        # written by another process, so that this one's peak memory does not start at the scene's arrays
        subprocess.run([sys.executable, __file__, "--write-scene", str(path), "--size", str(args.size)], check=True)
        model = build_h2rbox("swin_base_patch4_window7_224" if args.backbone == "swin_b" else "swin_tiny_patch4_window7_224",
                             num_classes=48, method="mona", model_kwargs=BACKBONES[args.backbone], square_classes=[5, 45]).eval()  # fmt: skip
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        padded = -(-args.size // 64) * 64
        windows = len(sliding_windows(padded, padded, 1024, 200, 0.6))
        start = time.perf_counter()
        with torch.no_grad(), LargeImage(path) as image:
            found = detect_full_image(model, image, batch=4)
        seconds = time.perf_counter() - start
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    mpx = args.size * args.size / 1e6
    print(f"backbone={args.backbone} scene={args.size}x{args.size} ({mpx:.1f} Mpx) windows={windows} "
          f"threads={args.threads} seconds={seconds:.1f} s/Mpx={seconds / mpx:.2f} s/window={seconds / windows:.2f} "
          f"peak_growth_MB={peak / 1e6:.0f} whole_image_MB={args.size * args.size * 3 / 1e6:.0f} detections={len(found['boxes'])}")  # fmt: skip


if __name__ == "__main__":
    main()
