"""What a cold inductor compile costs on a CPU: dynamic against static shapes, vectorised against scalar kernels.

Each case runs in its own spawned process with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` set to a new
folder), so every compile is cold, as in CI. A case compiles a test-sized Mona-tuned model and reports, for each
input size in turn, the first call's time (compile included) and how many graphs dynamo has built by then:

- ``vit-inference``: the dense ViT backbone of ``tests/deploy/test_compile.py`` (depth 1, embed 32, Mona
  bottleneck 8), eval, ``dynamic=True``, at 64 x 96 then 80 x 48;
- ``vit-train``: the Mona-tuned timm ViT classifier of the same tests, a training step (forward + backward);
- ``segmenter-inference`` / ``segmenter-train``: the tests' Mona-tuned UperNet (channels 8), eval at 32 x 32 then
  48 x 64, or a training step on 32 x 32 crops.

Each with ``--variants``: ``dynamic`` (``dynamic=True``, ``INDUCTOR_OPTIONS``), ``dynamic-scalar`` (the same with
``cpp.simdlen=1``: no vectorisation, so no vectorisation analysis), ``static`` (``dynamic=False``: one graph per
size, what the tasks' ``compile`` option does).

    python benchmarks/inductor_cost.py [--cases vit-inference,segmenter-inference] [--variants dynamic,static]
        [--threads 2] [--limit 600] [--output FILE.json]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time

import torch

CASES = ("vit-inference", "vit-train", "segmenter-inference", "segmenter-train")
VARIANTS = ("dynamic", "dynamic-scalar", "static")
TINY_VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2}


def _model(case: str) -> tuple[torch.nn.Module, list[tuple[int, int]], bool]:
    """The model, its input sizes, and whether it trains."""
    import timm

    import monatune

    torch.manual_seed(0)
    if case == "vit-inference":
        model = monatune.build_dense_backbone("vit_tiny_patch16_224", "mona", out_indices=[-1], bottleneck=8,
                                              model_kwargs=TINY_VIT)  # fmt: skip
        return model.eval(), [(64, 96), (80, 48)], False
    if case == "vit-train":
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, dynamic_img_size=True,
                                  dynamic_img_pad=True, **TINY_VIT)  # fmt: skip
        monatune.apply(model, "mona", bottleneck=8)
        return model.train(), [(64, 96), (80, 48)], True
    from monatune.tasks.segmentation import SemanticSegmenter

    task = SemanticSegmenter("vit_tiny_patch16_224", method="mona", num_classes=3, channels=8, aux_channels=8,
                             method_options={"bottleneck": 8, "dropout": 0.0}, dropout=0.0, crop=(32, 32),
                             model_kwargs=TINY_VIT)  # fmt: skip
    task.configure_model()
    if case == "segmenter-train":
        return task.model.train(), [(32, 32)], True
    return task.model.eval(), [(32, 32), (48, 64)], False


def _child(case: str, variant: str, threads: int, queue: mp.Queue) -> None:
    from monatune.compiling import INDUCTOR_OPTIONS

    torch.set_num_threads(threads)
    model, sizes, train = _model(case)
    options = {**INDUCTOR_OPTIONS, **({"cpp.simdlen": 1} if variant == "dynamic-scalar" else {})}
    compiled = torch.compile(model, dynamic=variant != "static", options=options)
    for size in sizes:
        x = torch.randn(2, 3, *size)
        start = time.perf_counter()
        if train:
            out = compiled(x)
            sum(v.float().sum() for v in (out.values() if isinstance(out, dict) else [out])).backward()
        else:
            with torch.no_grad():
                compiled(x)
        seconds = time.perf_counter() - start
        queue.put({"size": list(size), "first_call_s": round(seconds, 1),
                   "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"])})  # fmt: skip


def run_case(case: str, variant: str, threads: int, limit: float) -> dict:
    """One case in a fresh process with a cold inductor cache, stopped after ``limit`` seconds."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="inductor_cost.") as cache:
        old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # the spawned child inherits it
        try:
            child = ctx.Process(target=_child, args=(case, variant, threads, queue))
            start = time.perf_counter()
            child.start()
            child.join(limit)
            total = time.perf_counter() - start
            if child.is_alive():
                child.terminate()
                child.join()
        finally:
            if old is None:
                del os.environ["TORCHINDUCTOR_CACHE_DIR"]
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old
    calls = []
    while not queue.empty():
        calls.append(queue.get())
    row = {"case": case, "variant": variant, "calls": calls, "process_s": round(total, 1)}
    if child.exitcode != 0:
        row["note"] = f"stopped after {limit:.0f} s" if child.exitcode == -15 else f"exit code {child.exitcode}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=float, default=600.0, help="seconds a case may run")
    parser.add_argument("--output", help="also write the report here")
    args = parser.parse_args()
    cases, variants = args.cases.split(","), args.variants.split(",")
    unknown = sorted(set(cases) - set(CASES)) + sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown case or variant {unknown}: cases {CASES}, variants {VARIANTS}")
    report = {
        "command": f"python benchmarks/inductor_cost.py --cases {args.cases} --variants {args.variants} "
                   f"--threads {args.threads} --limit {args.limit:g}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "runs": [],
    }  # fmt: skip
    for case in cases:
        for variant in variants:
            row = run_case(case, variant, args.threads, args.limit)
            print(json.dumps(row), flush=True)
            report["runs"].append(row)
    text = json.dumps(report, indent=2)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
