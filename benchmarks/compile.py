"""Compiled training of a Mona-tuned dense backbone: compile and recompile time, compiled against eager step time.

One process, side by side: the same Mona-tuned dense backbone (forward + backward of the sum of its
stage maps, training mode) run eager and ``torch.compile``d. For static shapes (``dynamic=False``,
what the ``compile`` option does with ``size_buckets``) it reports the first call at size A (compile
included), the first call at size B (recompile), and the median step at size A eager and compiled.
``--dynamic`` adds ``dynamic=True`` runs, each in a child process stopped after ``--dynamic-limit``
seconds (a windowed Swin's symbolic-shape compile can take longer than any training step budget).
``--capture`` adds a ``dynamic=True`` capture by dynamo alone (no AOT autograd, no code generation) in
inference at every size in ``--sizes``, with the number of graphs it built: the cost of monatune's symbolic
shapes, and whether a new size recompiles.

    python benchmarks/compile.py [--backbone swin_tiny_patch4_window7_224] [--tiny] [--sizes 224x224,256x320]
        [--batch 2] [--repeats 5] [--threads 2] [--dynamic] [--capture] [--dynamic-limit 600] [--skip-static]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import time

import torch

import monatune
from monatune.compiling import INDUCTOR_OPTIONS

TINY = {"embed_dim": 32, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8)}


def _backbone(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(TINY) if args.tiny and "swin" in args.backbone else {}
    if args.tiny and "vit" in args.backbone:
        kwargs = {"depth": 4, "embed_dim": 64, "num_heads": 2}
    return monatune.build_dense_backbone(args.backbone, "mona", model_kwargs=kwargs).train()


def _step(model: torch.nn.Module, x: torch.Tensor) -> None:
    out = model(x)
    sum(v.sum() for v in out.values()).backward()


def _first(model: torch.nn.Module, x: torch.Tensor) -> float:
    t = time.perf_counter()
    _step(model, x)
    return time.perf_counter() - t


def _median(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    _step(model, x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _step(model, x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _dynamic_child(args: argparse.Namespace, sizes: list[tuple[int, int]], queue: mp.Queue, capture: bool) -> None:
    from torch._dynamo.testing import CompileCounter

    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    model = _backbone(args)
    if not capture:
        compiled = torch.compile(model, dynamic=True, options=INDUCTOR_OPTIONS)
        for size in sizes:
            queue.put((size, _first(compiled, torch.randn(args.batch, 3, *size)), None))
        return
    graphs = CompileCounter()
    compiled = torch.compile(model.eval(), dynamic=True, backend=graphs)
    for size in sizes:
        t = time.perf_counter()
        with torch.no_grad():
            compiled(torch.randn(args.batch, 3, *size))
        queue.put((size, time.perf_counter() - t, graphs.frame_count))


def _dynamic(args: argparse.Namespace, sizes: list[tuple[int, int]], capture: bool = False) -> list[dict]:
    queue: mp.Queue = mp.get_context("spawn").Queue()
    child = mp.get_context("spawn").Process(target=_dynamic_child, args=(args, sizes, queue, capture))
    start = time.perf_counter()
    child.start()
    child.join(args.dynamic_limit)
    if child.is_alive():
        child.terminate()
        child.join()
    rows = []
    while not queue.empty():
        size, seconds, graphs = queue.get()
        row = {"size": list(size), "first_call_s": round(seconds, 1)}
        rows.append(row if graphs is None else {**row, "graphs": graphs})
    if len(rows) < len(sizes):
        rows.append({"size": list(sizes[len(rows)]), "first_call_s": None,
                     "note": f"not finished after {time.perf_counter() - start:.0f} s in all"})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="swin_tiny_patch4_window7_224")
    parser.add_argument("--tiny", action="store_true", help="a test-sized model of the family")
    parser.add_argument("--sizes", default="224x224,256x320")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dynamic", action="store_true")
    parser.add_argument("--capture", action="store_true")
    parser.add_argument("--dynamic-limit", type=float, default=600.0)
    parser.add_argument("--skip-static", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    report = {
        "command": "python benchmarks/compile.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else f"--{k.replace('_', '-')}"
            for k, v in vars(args).items() if v is not False),  # fmt: skip
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    if not args.skip_static:
        report["static"] = _static(args, sizes)
    if args.capture:
        report["capture"] = _dynamic(args, sizes, capture=True)
    if args.dynamic:
        report["dynamic"] = _dynamic(args, sizes)
    print(json.dumps(report, indent=2))


def _static(args: argparse.Namespace, sizes: list[tuple[int, int]]) -> dict:
    a, b = (torch.randn(args.batch, 3, *s) for s in sizes[:2])
    model = _backbone(args)
    eager_a = _median(model, a, args.repeats)
    compiled = torch.compile(_backbone(args), dynamic=False, options=INDUCTOR_OPTIONS)
    first_a = _first(compiled, a)
    first_b = _first(compiled, b)
    compiled_a = _median(compiled, a, args.repeats)
    return {
        "first_call_A_s": round(first_a, 1), "first_call_B_s": round(first_b, 1),
        "eager_step_A_s": round(eager_a, 4), "compiled_step_A_s": round(compiled_a, 4),
        "compiled_over_eager": round(compiled_a / eager_a, 3),
    }  # fmt: skip


if __name__ == "__main__":
    main()
