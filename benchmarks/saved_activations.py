"""What autograd keeps for backward in one training forward, by the module that kept it.

Every tensor saved for backward (``torch.autograd.graph.saved_tensors_hooks``) is counted
once per storage, under the innermost module running when it was saved; storages of the
model's parameters (the weights, which every method holds anyway) are left out. timm
``swin_base_patch4_window7_224`` (random weights), batch 4 at 224x224.

    python benchmarks/saved_activations.py [--methods full,mona,fixed]
"""
from __future__ import annotations

import argparse
import collections

import timm
import torch
import torch.nn.functional as F

import monatune


def saved_by_module(method: str, batch: int) -> tuple[float, collections.Counter]:
    torch.manual_seed(0)
    model = timm.create_model("swin_base_patch4_window7_224")
    if method != "full":
        monatune.apply(model, method)
    model.train()
    running: list[str] = []

    def enter(module: torch.nn.Module, args: tuple) -> None:
        running.append(type(module).__name__)

    def leave(module: torch.nn.Module, args: tuple, out: object) -> None:
        running.pop()

    for module in model.modules():
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    by_module: collections.Counter = collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in weights and key not in seen:
            seen.add(key)
            by_module[running[-1] if running else "(outside modules)"] += t.untyped_storage().nbytes()
        return t

    images, labels = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(images), labels)
    del loss
    return sum(by_module.values()) / 2**20, by_module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="full,mona,fixed")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    results = {m: saved_by_module(m, args.batch) for m in args.methods.split(",")}
    names = sorted({n for _, counts in results.values() for n in counts}, key=lambda n: -max(c[n] for _, c in results.values()))
    print("| kept by | " + " | ".join(f"{m} MiB" for m in results) + " |")
    print("|---|" + "---:|" * len(results))
    for name in names:
        cells = " | ".join(f"{counts[name] / 2**20:.1f}" for _, counts in results.values())
        print(f"| {name} | {cells} |")
    print("| **total** | " + " | ".join(f"**{total:.1f}**" for total, _ in results.values()) + " |")


if __name__ == "__main__":
    main()
