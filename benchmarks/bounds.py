"""How close Mona-tuning can come to issue 7's step and inference targets on this machine.

Everything runs in ONE process, alternating the variants in rounds, so drift in machine speed
hits them alike. timm ``swin_base_patch4_window7_224`` (random weights), batch 4 at 224x224:

Inference
    ``mona``      the Mona-tuned model (monatune's fused Mona), eval mode;
    ``bypass``    the same model object with every Mona replaced by the identity: the plain
                  backbone, same weights, same memory layout;
    ``gemm floor``  the three GEMMs (C -> 64, 64 -> 64, 64 -> C) of every Mona at its own
                  shape, timed alone: the least extra work any exact fp32 Mona must do.
    ``(bypass + gemm floor) / bypass`` is the best inference ratio reachable here.

Training step (forward, backward, AdamW step)
    ``full``      full fine-tuning of the plain backbone (a separate copy, same weights);
    ``mona``      Mona-tuning;
    ``bypass+input grad``  the Mona-tuned model with Monas bypassed and the patch
                  embedding's output requiring a gradient: the frozen backbone's forward and
                  its input-gradient backward down to the first block, which Mona-tuning
                  cannot avoid (the first Mona sits inside the first block; only that block's
                  attention backward could be skipped);
    ``mona floor``  per Mona, the nine GEMMs and the one depthwise convolution with both its
                  gradients (``benchmarks/mona_module.py``'s floor), summed over all Monas.
    ``(bypass+input grad + mona floor) / full`` is the best step ratio reachable here.

    python benchmarks/bounds.py [--rounds 3] [--steps 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import monatune
from monatune.adapters.mona import Mona

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mona_module import floor_step, timed  # noqa: E402


def alternate(fns: dict, rounds: int, steps: int) -> tuple[dict, dict]:
    """Run the functions in turn, ``rounds`` times: per-round medians (s) and their medians (ms)."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, steps, warmup=1))
    return times, {name: statistics.median(v) * 1e3 for name, v in times.items()}


class bypassed:
    """Within this block every Mona in ``model`` is the identity."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.monas = [m for m in model.modules() if isinstance(m, Mona)]

    def __enter__(self) -> None:
        for mona in self.monas:
            mona.forward = lambda x, *args, **kwargs: x

    def __exit__(self, *exc) -> None:
        for mona in self.monas:
            del mona.forward


def mona_shapes(model: torch.nn.Module, images: torch.Tensor) -> list[tuple[int, ...]]:
    shapes = []
    hooks = [m.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
             for m in model.modules() if isinstance(m, Mona)]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return shapes


def gemm_floor(shapes: list[tuple[int, ...]], r: int = 64):
    """The three forward GEMMs of every Mona, at its shape."""
    work = []
    for shape in shapes:
        M, C = int(torch.tensor(shape[:-1]).prod()), shape[-1]
        work.append((torch.randn(M, C), torch.randn(r, C), torch.randn(r, r), torch.randn(C, r), torch.randn(M, r)))

    def run():
        for z, W1, P, W2, h in work:
            z @ W1.t(), h @ P.t(), h @ W2.t()

    return run


def step_floor(shapes: list[tuple[int, ...]]):
    runs = [floor_step(s[0], s[1], s[3]) for s in shapes]  # (B, H, W, C) maps

    def run():
        for fn in runs:
            fn()

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="swin_base_patch4_window7_224")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    full = timm.create_model(args.model, num_classes=1000)
    tuned = copy.deepcopy(full)
    monatune.apply(tuned, "mona")
    images = torch.randn(args.batch, 3, 224, 224)
    labels = torch.randint(0, 1000, (args.batch,))
    shapes = mona_shapes(tuned, images)
    if any(len(s) != 4 for s in shapes):
        raise SystemExit("this script handles (B, H, W, C) Mona maps (Swin); got token inputs")
    print(f"{args.model}, batch {args.batch}, {len(shapes)} Monas; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {args.threads} threads")

    # --- inference ---------------------------------------------------------------------------
    tuned.eval()

    def infer_mona():
        with torch.inference_mode():
            tuned(images)

    def infer_bypass():
        with torch.inference_mode(), bypassed(tuned):
            tuned(images)

    inference = {"mona": infer_mona, "bypass": infer_bypass, "gemm floor": gemm_floor(shapes)}
    t_inf, inf = alternate(inference, args.rounds, args.steps)

    # --- training step -----------------------------------------------------------------------
    full.train()
    tuned.train()
    opt_full = torch.optim.AdamW(full.parameters(), lr=1e-4)
    opt_tuned = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-4)
    stem = tuned.patch_embed.register_forward_hook(lambda mod, args, out: out.detach().requires_grad_(bypass_on[0]))
    bypass_on = [False]

    def step(model, optimizer, x):
        def run():
            F.cross_entropy(model(x), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    def step_bypass():
        bypass_on[0] = True
        with bypassed(tuned):
            step(tuned, opt_tuned, images)()
        bypass_on[0] = False

    training = {"full": step(full, opt_full, images), "mona": step(tuned, opt_tuned, images),
                "bypass+input grad": step_bypass, "mona floor": step_floor(shapes)}
    t_step, st = alternate(training, args.rounds, args.steps)
    stem.remove()

    print("\n| inference | ms |\n|---|---:|")
    for name, value in inf.items():
        print(f"| {name} | {value:,.1f} |")
    print(f"\nmona / bypass = {inf['mona'] / inf['bypass']:.3f}; "
          f"best reachable (bypass + gemm floor) / bypass = {(inf['bypass'] + inf['gemm floor']) / inf['bypass']:.3f}")
    print("\n| training step | ms |\n|---|---:|")
    for name, value in st.items():
        print(f"| {name} | {value:,.1f} |")
    print(f"\nmona / full = {st['mona'] / st['full']:.3f}; "
          f"bypass+input grad / full = {st['bypass+input grad'] / st['full']:.3f}; "
          f"best reachable (bypass+input grad + mona floor) / full = "
          f"{(st['bypass+input grad'] + st['mona floor']) / st['full']:.3f}")
    print(f"per-round medians: inference {dict((k, [round(x * 1e3, 1) for x in v]) for k, v in t_inf.items())}")
    print(f"per-round medians: step {dict((k, [round(x * 1e3, 1) for x in v]) for k, v in t_step.items())}")


if __name__ == "__main__":
    main()
