"""Mona module forward+backward: monatune's fast path against the release's structure.

The release's structure (re-written here for comparison): three separate depthwise
convolutions, averaged, plus the identity; a separate 1x1 projector with its skip; (B, N, C)
tokens reshaped to NCHW and back. Both run the same parameters on the same input, side by side
in one process, at the token-map shapes of Swin-B's four stages for a batch of 4 at 224x224.

    python benchmarks/mona_module.py [--batch 4] [--repeats 20] [--threads 2]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from monatune.adapters.mona import Mona


def release_forward(mona: Mona, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    identity = x
    z = mona.norm(x) * mona.gamma + x * mona.gammax
    p = mona.project1(z)
    b, n, c = p.shape
    m = p.reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2)
    op = mona.adapter_conv
    convs = op.convs()
    m = sum(F.conv2d(m, cv.weight, cv.bias, padding=cv.kernel_size[0] // 2, groups=c) for cv in convs) / len(convs) + m
    m = F.conv2d(m, op.projector.weight, op.projector.bias) + m
    m = m.permute(0, 2, 3, 1).reshape(b, n, c)
    return identity + mona.project2(mona.dropout(F.gelu(m)))


def timed(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, batch {args.batch}")
    print("| stage | map (B, H, W, C) | release structure ms | monatune ms | release / monatune |")
    print("|---|---|---|---|---|")
    for stage, (side, dim) in enumerate([(56, 128), (28, 256), (14, 512), (7, 1024)]):
        mona = Mona(dim)
        x = torch.randn(args.batch, side * side, dim, requires_grad=True)

        def release_step():
            release_forward(mona, x, (side, side)).sum().backward()

        def fast_step():
            mona(x.unflatten(1, (side, side))).sum().backward()

        # Alternate the two so that drift in machine speed hits both alike.
        t_release, t_fast = [], []
        for _ in range(3):
            t_release.append(timed(release_step, args.repeats // 3 or 1))
            t_fast.append(timed(fast_step, args.repeats // 3 or 1))
        r, f = statistics.median(t_release), statistics.median(t_fast)
        print(f"| {stage} | ({args.batch}, {side}, {side}, {dim}) | {r * 1e3:.2f} | {f * 1e3:.2f} | {r / f:.2f} |")


if __name__ == "__main__":
    main()
