"""How many parameters a (tuned) model has, and how many train."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .tuning import adapter_modules, get_state, model_name

__all__ = ["ParamReport", "count_parameters"]


@dataclass
class ParamReport:
    total: int  # every parameter, adapters included
    trainable: int  # parameters with requires_grad
    adapter: int  # parameters inside adapter modules (all adapters)
    head: int  # parameters of the head modules
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> {"total": n, "trainable": n}
    method: str | None = None
    model: str | None = None

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def backbone(self) -> int:
        """Parameters of the base model (not adapters, not head)."""
        return self.total - self.adapter - self.head

    @property
    def trainable_backbone(self) -> int:
        """Trainable parameters outside the head: the adapters plus any of the model's own weights that train."""
        return self.trainable - self.by_kind.get("head", {}).get("trainable", 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "backbone": self.backbone,
            "trainable_backbone": self.trainable_backbone,
            "trainable_percent": round(self.trainable_percent, 4),
        }

    def __str__(self) -> str:
        name = f"{self.model} " if self.model else ""
        method = f"[{self.method}] " if self.method else ""
        lines = [
            f"{name}{method}trainable {self.trainable:,} of {self.total:,} ({self.trainable_percent:.2f}%)",
            f"  {'kind':<28}{'total':>14}{'trainable':>14}",
        ]
        for kind, counts in self.by_kind.items():
            lines.append(f"  {kind:<28}{counts['total']:>14,}{counts['trainable']:>14,}")
        return "\n".join(lines)


def count_parameters(model: nn.Module) -> ParamReport:
    """Count total, trainable, adapter and head parameters, with a breakdown by kind.

    Kinds: ``adapter:<method>`` for adapter modules, ``head`` for the head modules named at
    :func:`monatune.apply`, ``backbone`` for everything else. Works on the meta device.
    """
    state = get_state(model)
    kind_of: dict[int, str] = {}
    for _, name, module in adapter_modules(model):
        method = state.adapters[name].method if state else "adapter"
        for p in module.parameters():
            kind_of[id(p)] = f"adapter:{method}"
    for head in state.head if state else []:
        for p in model.get_submodule(head).parameters():
            kind_of[id(p)] = "head"
    by_kind: dict[str, dict[str, int]] = {}
    for p in model.parameters():
        counts = by_kind.setdefault(kind_of.get(id(p), "backbone"), {"total": 0, "trainable": 0})
        counts["total"] += p.numel()
        counts["trainable"] += p.numel() if p.requires_grad else 0
    total = sum(c["total"] for c in by_kind.values())
    return ParamReport(
        total=total,
        trainable=sum(c["trainable"] for c in by_kind.values()),
        adapter=sum(c["total"] for k, c in by_kind.items() if k.startswith("adapter:")),
        head=by_kind.get("head", {}).get("total", 0),
        by_kind=by_kind,
        method=state.adapters[state.active].method if state else None,
        model=model_name(model),
    )
