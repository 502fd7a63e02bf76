"""What a monatune run leaves in its directory, written by Lightning callbacks.

- :class:`ResumeCheckpoint` (in :mod:`.resume`, with how runs stop and resume): ``checkpoints/last.ckpt``.
- :class:`AdapterCheckpoint`: ``adapter-best/`` and ``adapter-last/``, adapter-only files
  (``monatune.save_adapter``: adapters, head, any trained base tensors).
- :class:`RunSummary`: ``results.json`` (metric, parameters, memory, speed) and ``curves.png``.
"""
from __future__ import annotations

import csv
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities import rank_zero_only

from safetensors.torch import save

from ..atomic import write_file
from ..checkpoints import save_adapter
from .module import TASK_HEAD_FILE, task_head_state

__all__ = ["AdapterCheckpoint", "RunSummary", "PredictionWriter", "peak_memory_bytes"]


def peak_memory_bytes(device: torch.device | None = None) -> tuple[int, str]:
    """Peak memory: CUDA's max allocated on a GPU, else this process's peak resident set size."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "peak_rss"


def _write_json(path: Path, data: Any) -> None:
    write_file(path, (json.dumps(data, indent=2) + "\n").encode())


class AdapterCheckpoint(Callback):
    """Adapter-only files of the best validation epoch and of the last epoch."""

    def __init__(self) -> None:
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.last_metric: float | None = None

    def _save(self, trainer: L.Trainer, pl_module: Any, name: str, metric: float | None) -> None:
        if not trainer.is_global_zero:
            return
        meta = {"epoch": trainer.current_epoch, "step": trainer.global_step, pl_module.monitor: metric}
        head = task_head_state(pl_module.model, pl_module.tuned)
        # a detector's neck and heads live outside the tuned backbone; they are swapped in with the adapter
        extra = {TASK_HEAD_FILE: save(head)} if head else None
        save_adapter(pl_module.tuned, Path(trainer.default_root_dir) / name, metadata=meta, extra_files=extra)

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
    """Times the training steps and writes ``results.json`` (and ``curves.png`` after ``fit``).

    It also reports the images ``on_bad_image=skip`` left out (the batches' ``"skipped"`` paths):
    at the end of each training epoch and evaluation pass it gathers them from every process,
    warns once per run naming each new file, and raises :class:`~monatune.data.images.BadImageError`
    when the pass read no image at all. ``results.json`` holds ``skipped_images``, the number of
    distinct files, and ``skipped_files``, their paths (the first ``max_listed``, sorted).

    Args:
        warmup_steps: Steps left out of the timing.
        max_listed: How many skipped files ``results.json`` and one warning list by name.
    """

    def __init__(self, warmup_steps: int = 3, max_listed: int = 100) -> None:
        self.warmup_steps, self.max_listed = warmup_steps, max_listed
        self.step_seconds: list[float] = []
        self.images = 0
        self.skipped_files: set[str] = set()  # every process's, this run (kept in the resumable checkpoint)
        self._pass_skipped: dict[str, list[str]] = {}  # this process's, in the current pass of each stage
        self._pass_images: dict[str, int] = {}
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
        self._count(batch, "train")

    def _count(self, batch: Any, stage: str) -> None:
        if not isinstance(batch, dict):
            return
        self._pass_skipped.setdefault(stage, []).extend(batch.get("skipped") or [])
        images = batch.get("image", batch.get("images"))
        self._pass_images[stage] = self._pass_images.get(stage, 0) + (len(images) if images is not None else 0)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        if not trainer.sanity_checking:  # the sanity check's batches are read again by the first real pass
            self._count(batch, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self._count(batch, "test")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self._count(batch, "predict")

    @staticmethod
    def _listing(paths: list[str], limit: int) -> str:
        shown = ", ".join(f"'{p}'" for p in paths[:limit])
        return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")

    @staticmethod
    def _split_name(trainer: L.Trainer, stage: str) -> str:
        """``"split 'train' "`` from the data module's ``splits`` (train, val, test), else ``""``."""
        data = trainer.datamodule
        if stage == "predict":
            path = getattr(data, "predict_path", None)
            return f"files under '{path}' " if path else ""
        splits = getattr(data, "splits", None)
        return f"split {splits[('train', 'val', 'test').index(stage)]!r} " if splits and len(splits) == 3 else ""

    def _end_pass(self, trainer: L.Trainer, stage: str) -> None:
        """Gather the pass's skipped files from every process; warn about new ones; fail if nothing was read."""
        from lightning.pytorch.utilities import rank_zero_warn

        from ..data.images import BadImageError

        local = (self._pass_skipped.pop(stage, []), self._pass_images.pop(stage, 0))
        parts = [local]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, local)
        skipped = sorted({path for files, _ in parts for path in files})
        read = sum(n for _, n in parts)
        new = [path for path in skipped if path not in self.skipped_files]
        self.skipped_files.update(new)
        what = {"train": "training", "val": "validation", "test": "test", "predict": "predict"}[stage]
        if new:
            rank_zero_warn(f"on_bad_image=skip left out {len(new)} unreadable image(s) in this {what} pass "
                           f"({len(self.skipped_files)} in the run so far; each is named once): "
                           f"{self._listing(new, self.max_listed)}")  # fmt: skip
        if skipped and read == 0:
            split = self._split_name(trainer, stage)
            raise BadImageError(
                f"no image of the {what} {split}could be read: all {len(skipped)} were unreadable and skipped "
                f"(on_bad_image=skip), e.g. {self._listing(skipped, 3)}; there is nothing to "
                f"{'train on' if stage == 'train' else 'evaluate'}. Fix or replace those files, or check data.root "
                "(and data.splits); with on_bad_image=error the first one stops the run with its reason"
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_pass(trainer, "train")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the epoch's validation runs before on_train_epoch_end: end the training pass first, so that an
        # epoch that read no image stops before its untrained weights are scored and saved as adapter-best/
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                self._end_pass(trainer, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            self._pass_skipped.pop("val", None)
            self._pass_images.pop("val", None)
            return
        self._end_pass(trainer, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_pass(trainer, "test")

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_pass(trainer, "predict")

    def state_dict(self) -> dict[str, Any]:
        # with the interrupted pass so far (this process's), so that a resumed run still names and checks it
        return {"skipped_files": sorted(self.skipped_files), "pass_skipped": self._pass_skipped,
                "pass_images": self._pass_images}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_files = set(state.get("skipped_files", []))
        self._pass_skipped = {k: list(v) for k, v in state.get("pass_skipped", {}).items()}
        self._pass_images = dict(state.get("pass_images", {}))

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
            "skipped_images": len(self.skipped_files),  # distinct files, every process and pass
            "skipped_files": sorted(self.skipped_files)[: self.max_listed],
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
