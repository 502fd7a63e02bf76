"""Mona module forward+backward: monatune's implementations against the release's structure.

Runs one ``Mona`` at the token-map shape of each Swin-B stage (batch 4 at 224x224 by default),
training mode (dropout 0.1 live), forward plus backward of a random output gradient, with the
three implementations of the same module (``Mona.impl``) side by side in one process:

- ``release``: the release's structure (three depthwise convolutions, separate projector skip,
  NCHW view);
- ``plain``: the assembled kernel as ordinary autograd operations;
- ``fused``: monatune's default, one autograd function with a hand-written backward.

A fourth column times only the work every correct implementation must do in fp32: the nine
GEMMs of the three linear layers (forward, input and weight gradients) and one 7x7 depthwise
convolution with its input and kernel gradients. ``release / floor`` bounds the speed-up any
implementation of the same arithmetic could reach on this machine.

    python benchmarks/mona_module.py [--batch 4] [--repeats 21] [--threads 2] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from monatune.adapters.mona import Mona

STAGES = [(56, 128), (28, 256), (14, 512), (7, 1024)]  # Swin-B at 224: (side, channels)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def floor_step(batch: int, side: int, dim: int, r: int = 64, device: str = "cpu"):
    """The GEMMs and the one depthwise convolution (with both its gradients) of a Mona step."""
    M = batch * side * side
    randn = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    z, dout = randn(M, dim), randn(M, dim)
    W1, P, W2, h = randn(r, dim), randn(r, r), randn(dim, r), randn(M, r)
    d = randn(batch, side, side, r).permute(0, 3, 1, 2)  # channels-last NCHW view
    K, kb = randn(r, 1, 7, 7), randn(r)
    conv = ([r], [1, 1], [3, 3], [1, 1], False, [0, 0], r)

    def run():
        z @ W1.t(), h @ P.t(), h @ W2.t()  # forward
        dout @ W2, dout.t() @ h, h @ P, h.t() @ h, h @ W1, h.t() @ z  # backward
        o = F.conv2d(d, K, kb, padding=3, groups=r)
        torch.ops.aten.convolution_backward(o, d, K, *conv, [True, False, False])
        torch.ops.aten.convolution_backward(o, d, K, *conv, [False, True, False])

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    print(f"torch {torch.__version__}, {where}, {args.threads} threads, batch {args.batch}")
    print("| stage | map (B, H, W, C) | release ms | plain ms | fused ms | floor ms | release / fused | release / floor |")
    print("|---|---|---|---|---|---|---|---|")
    for stage, (side, dim) in enumerate(STAGES):
        mona = Mona(dim).to(args.device).train()
        x = torch.randn(args.batch, side, side, dim, device=args.device, requires_grad=True)
        grad = torch.randn_like(x)

        def step(impl):
            def run():
                mona.impl = impl
                mona(x).backward(grad)
            return run

        fns = {"release": step("release"), "plain": step("plain"), "fused": step("fused"), "floor": floor_step(args.batch, side, dim, device=args.device)}
        # Alternate the four in 3 rounds so that drift in machine speed hits all alike.
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(3):
            for name, fn in fns.items():
                times[name].append(timed(fn, max(args.repeats // 3, 1)))
        t = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(
            f"| {stage} | ({args.batch}, {side}, {side}, {dim}) | {t['release']:.2f} | {t['plain']:.2f} | {t['fused']:.2f} "
            f"| {t['floor']:.2f} | {t['release'] / t['fused']:.2f} | {t['release'] / t['floor']:.2f} |"
        )


if __name__ == "__main__":
    main()
