"""Speed of monatune's pure-PyTorch rotated RoIAlign (``MultiScaleRotatedRoIAlign``) per 1,000 RoIs.

The setting of Oriented R-CNN's RoI head on a 1024 x 1024 image: 256-channel FPN maps at strides 4, 8, 16, 32
(256^2 ... 32^2), 7 x 7 bins, 2 x 2 points per bin, RoIs with ``sqrt(w h)`` log-uniform in [16, 800] px
(so spread over the four levels), aspect ratios in [1/4, 4] and random angles, in one image. For each RoI
count it times the forward pass (no autograd) and the forward plus backward to the features (the sum of the
output, as a training step's gradient reaches the FPN), as the median of ``--repeats`` runs after a warm-up,
and prints one line per setting.

    python benchmarks/roi_align_rotated.py [--threads 2] [--rois 512 2000] [--repeats 7] [--device cpu]
"""
from __future__ import annotations

import argparse
import math
import platform
import shlex
import statistics
import sys
import time

import torch

from monatune.ops import MultiScaleRotatedRoIAlign

STRIDES = (4, 8, 16, 32)


def make_rois(n: int, image: int, generator: torch.Generator) -> torch.Tensor:
    scale = torch.exp(math.log(16) + torch.rand(n, generator=generator) * (math.log(800) - math.log(16)))
    ratio = torch.exp((torch.rand(n, generator=generator) * 2 - 1) * math.log(4))
    w, h = scale * ratio.sqrt(), scale / ratio.sqrt()
    centre = torch.rand(n, 2, generator=generator) * image
    theta = (torch.rand(n, generator=generator) - 0.5) * math.pi
    return torch.cat([torch.zeros(n, 1), centre, w[:, None], h[:, None], theta[:, None]], dim=1)


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--rois", type=int, nargs="+", default=[512, 2000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--image", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(f"# {command}")
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"device {device}")  # fmt: skip

    g = torch.Generator().manual_seed(0)
    sizes = [args.image // s for s in STRIDES]
    features = [torch.randn(1, args.channels, size, size, generator=g).to(device) for size in sizes]
    extractor = MultiScaleRotatedRoIAlign(STRIDES)
    for n in args.rois:
        rois = make_rois(n, args.image, g).to(device)
        per_level = torch.bincount(extractor.map_levels(rois), minlength=len(STRIDES)).tolist()

        def forward() -> None:
            with torch.no_grad():
                extractor(features, rois)

        leaves = [f.detach().requires_grad_() for f in features]

        def forward_backward() -> None:
            extractor(leaves, rois).sum().backward()
            for f in leaves:
                f.grad = None

        for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
            seconds = timed(fn, args.repeats, device)
            print(f"{name:17s} rois={n:5d} levels={per_level} median {seconds * 1e3:8.1f} ms "
                  f"= {seconds * 1e3 * 1000 / n:8.1f} ms per 1,000 RoIs "
                  f"({args.channels} ch, {args.image}px image, 7x7, sampling 2, {args.threads} thread(s), "
                  f"{args.repeats} repeats)")  # fmt: skip


if __name__ == "__main__":
    main()
