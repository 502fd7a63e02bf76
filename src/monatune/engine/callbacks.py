"""What a monatune run leaves in its directory, written by Lightning callbacks.

- :class:`ResumeCheckpoint`: ``checkpoints/last.ckpt``, Lightning's full training state
  (trainable tensors, optimiser, schedule, loops, data position, RNG), for ``--resume``.
- :class:`AdapterCheckpoint`: ``adapter-best/`` and ``adapter-last/``, adapter-only files
  (``monatune.save_adapter``: adapters, head, any trained base tensors).
- :class:`RunSummary`: ``results.json`` (metric, parameters, memory, speed) and ``curves.png``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from safetensors.torch import save_file

from ..checkpoints import save_adapter
from .module import TASK_HEAD_FILE, task_head_state

__all__ = ["ResumeCheckpoint", "AdapterCheckpoint", "RunSummary", "PredictionWriter", "peak_memory_bytes"]


def peak_memory_bytes(device: torch.device | None = None) -> tuple[int, str]:
    """Peak memory: CUDA's max allocated on a GPU, else this process's peak resident set size."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "peak_rss"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class ResumeCheckpoint(ModelCheckpoint):
    """``<run>/checkpoints/last.ckpt`` every ``every_n_train_steps`` steps and at every epoch's end."""

    def __init__(self, every_n_train_steps: int = 100) -> None:
        super().__init__(save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        super().setup(trainer, pl_module, stage)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ModelCheckpoint saves either every n steps or every epoch; a resumable run wants both
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class AdapterCheckpoint(Callback):
    """Adapter-only files of the best validation epoch and of the last epoch."""

    def __init__(self) -> None:
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.last_metric: float | None = None

    def _save(self, trainer: L.Trainer, pl_module: Any, name: str, metric: float | None) -> None:
        if not trainer.is_global_zero:
            return
        final = Path(trainer.default_root_dir) / name
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        meta = {"epoch": trainer.current_epoch, "step": trainer.global_step, pl_module.monitor: metric}
        save_adapter(pl_module.tuned, tmp, metadata=meta)
        head = task_head_state(pl_module.model, pl_module.tuned)
        if head:  # a detector's neck and heads, which live outside the tuned backbone
            save_file(head, str(tmp / TASK_HEAD_FILE))
        shutil.rmtree(final, ignore_errors=True)  # the new one is complete before the old goes
        os.replace(tmp, final)

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(pl_module.monitor)
        if value is None:
            return
        self.last_metric = float(value)
        if self.best is None or (not math.isnan(self.last_metric) and self.last_metric > self.best):
            self.best, self.best_epoch = self.last_metric, trainer.current_epoch
            self._save(trainer, pl_module, "adapter-best", self.last_metric)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._save(trainer, pl_module, "adapter-last", self.last_metric)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "last_metric": self.last_metric}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.last_metric = state["best"], state["best_epoch"], state["last_metric"]


class RunSummary(Callback):
    """Times the training steps and writes ``results.json`` (and ``curves.png`` after ``fit``)."""

    def __init__(self, warmup_steps: int = 3) -> None:
        self.warmup_steps = warmup_steps
        self.step_seconds: list[float] = []
        self.images = 0
        self.skipped = 0
        self._t0 = 0.0
        self._started = 0.0

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module)
        self.step_seconds.append(time.perf_counter() - self._t0)
        self.images += len(batch.get("image", batch.get("images", [])))
        self.skipped += len(batch.get("skipped") or [])

    def _on_eval_batch(self, batch: Any) -> None:
        if isinstance(batch, dict):
            self.skipped += len(batch.get("skipped") or [])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        if trainer.state.fn != "fit":
            self._on_eval_batch(batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self._on_eval_batch(batch)

    def _common(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any]:
        report = pl_module.param_report()
        memory, memory_kind = peak_memory_bytes(pl_module.device)
        outside = {id(p) for p in pl_module.model.parameters()} - {id(p) for p in pl_module.tuned.parameters()}
        return {
            "method": pl_module.method,
            "method_options": pl_module.method_options,
            "backbone": pl_module.backbone_name,
            "task": type(pl_module).__name__,
            "parameters": {
                "total": report.total,
                "trainable": report.trainable,
                "adapter": report.adapter,
                "head": report.head,
                "trainable_percent": round(report.trainable_percent, 4),
                # a detector's or segmenter's neck and heads, outside the tuned backbone (all trainable)
                "task_head": sum(p.numel() for p in pl_module.model.parameters() if id(p) in outside),
            },
            "peak_memory_bytes": memory,
            "peak_memory_kind": memory_kind,
            "devices": trainer.world_size,
            "device_type": pl_module.device.type,
            "precision": str(trainer.precision),
            "skipped_images": self.skipped,
        }

    @rank_zero_only
    def _write(self, trainer: L.Trainer, data: dict[str, Any]) -> None:
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        _write_json(root / "results.json", data)

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        timed = self.step_seconds[self.warmup_steps :] or self.step_seconds
        sec = statistics.median(timed) if timed else float("nan")
        per_step = self.images / len(self.step_seconds) if self.step_seconds else 0.0
        adapters = next((c for c in trainer.callbacks if isinstance(c, AdapterCheckpoint)), None)
        data = {
            "monitor": pl_module.monitor,
            "best": adapters.best if adapters else None,
            "best_epoch": adapters.best_epoch if adapters else None,
            "last": adapters.last_metric if adapters else None,
            **self._common(trainer, pl_module),
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "seconds_per_iteration": sec,
            "images_per_second": per_step * trainer.world_size / sec if sec and sec == sec else None,
            "fit_seconds": time.perf_counter() - self._started,
        }
        self._write(trainer, data)
        if trainer.is_global_zero:
            plot_curves(Path(trainer.default_root_dir), pl_module.monitor)

    def _eval_end(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{stage}/")}
        # which weights were scored: the run's adapter-best/ or adapter-last/ (--adapter_choice), or one given
        adapter = getattr(pl_module, "adapter_path", None)
        self._write(trainer, {"metrics": metrics, "adapter_dir": adapter, **self._common(trainer, pl_module)})

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.state.fn == "validate":
            self._eval_end(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._eval_end(trainer, pl_module, "test")


def _read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(run_dir: Path, monitor: str) -> Path | None:
    """``curves.png``: training loss per step and the validation metric per epoch (from ``metrics.csv``)."""
    rows = _read_metrics(run_dir / "metrics.csv")
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str, x: str) -> tuple[list[float], list[float]]:
        points: dict[float, float] = {}  # a resumed run repeats steps; the later row wins
        for row in rows:
            if row.get(key) not in (None, "") and row.get(x) not in (None, ""):
                points[float(row[x])] = float(row[key])
        return list(points), list(points.values())

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(*series("train/loss", "step"), lw=1)
    ax1.set(xlabel="step", ylabel="training loss", title="training loss")
    ax2.plot(*series(monitor, "epoch"), marker="o")
    ax2.set(xlabel="epoch", ylabel=monitor, title=monitor)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class PredictionWriter(BasePredictionWriter):
    """``predictions.json`` with every image's predictions, and a picture of each (PNG).

    The task's ``predict_step`` gives one JSON-ready dict per image with its ``path``; the task's
    ``draw_prediction(row)`` draws it (default: the image captioned with its top classes).
    """

    def __init__(self, max_pictures: int = 200) -> None:
        super().__init__(write_interval="epoch")
        self.max_pictures = max_pictures

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: Any, predictions: Any, batch_indices: Any) -> None:
        rows = [row for batch in predictions for row in batch]
        if trainer.world_size > 1:  # gather every process's share
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if not trainer.is_global_zero:
            return
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        rows.sort(key=lambda r: r["path"])
        _write_json(root / "predictions.json", rows)
        pictures = root / "pictures"
        pictures.mkdir(exist_ok=True)
        draw = getattr(pl_module, "draw_prediction", caption)  # a task can draw its own (boxes, masks)
        for i, row in enumerate(rows[: self.max_pictures]):
            draw(row).save(pictures / f"{i:05d}_{Path(row['path']).stem}.png")


def caption(row: dict[str, Any], width: int = 320):  # noqa: ANN201
    """The image with its top classes and scores written underneath."""
    from PIL import Image, ImageDraw

    from ..data.images import read_rgb

    image = read_rgb(row["path"])  # 16-bit and float images scaled as the model saw them
    scale = width / max(image.size)
    if scale < 1 or max(image.size) < 160:  # shrink large images, enlarge tiny ones (digits, icons)
        image = image.resize((max(round(image.width * scale), 1), max(round(image.height * scale), 1)),
                             Image.BICUBIC if scale < 1 else Image.NEAREST)
    lines = [f"{t['name']}: {t['score']:.3f}" for t in row["top"][:3]]
    out = Image.new("RGB", (max(image.width, 200), image.height + 14 * len(lines) + 6), "white")
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    for j, line in enumerate(lines):
        draw.text((4, image.height + 3 + 14 * j), line, fill="black")
    return out
