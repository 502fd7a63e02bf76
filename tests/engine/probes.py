"""Callbacks the engine tests add to a run with ``-c`` (importable once tests/engine is on PYTHONPATH)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL this process before training step ``step``, as a crash or a pre-empted job would end."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def trainable_digest(module: Any) -> str:
    """sha256 of every trainable parameter's name and bytes, in name order."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RankReport(L.Callback):
    """Writes ``<out_dir>/rank<N>.json`` at the end of fit: weights digest, images validated, val metrics."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.val_images = 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.val_images = 0

    def on_validation_batch_end(  # noqa: ANN001
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.val_images += len(batch["image"])

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "digest": trainable_digest(pl_module.tuned),  # names as in a plain timm model
            "val_images": self.val_images,
            "val_acc": float(trainer.callback_metrics["val/acc"]),
            "val_loss": float(trainer.callback_metrics["val/loss"]),
        }
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


class SignalAtStep(L.Callback):
    """Send ``signal`` (by number) to this process before training step ``step``, as SLURM or Ctrl-C would."""

    def __init__(self, step: int, signal: int) -> None:
        self.step, self.signal = step, signal

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)


class KillAfter(L.Callback):
    """SIGKILL this process ``seconds`` after training starts, wherever it is then (a step, a save, validation)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        import threading

        timer = threading.Timer(self.seconds, os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()


class KillAfterStepCheckpoint(L.Callback):
    """SIGKILL this process right after the resumable checkpoint's save at the end of step ``step``, before
    Lightning writes that step's row of metrics.csv."""

    def __init__(self, step: int) -> None:
        self.step = step

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        from monatune.engine.resume import ResumeCheckpoint

        checkpoint = next(c for c in trainer.callbacks if isinstance(c, ResumeCheckpoint))
        save = checkpoint._save_checkpoint

        def save_then_kill(trainer: L.Trainer, filepath: str) -> None:
            save(trainer, filepath)
            if trainer.global_step == self.step + 1 and trainer.training:  # the save after step `step`
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint._save_checkpoint = save_then_kill


class SignalAtTestBatch(L.Callback):
    """Send ``signal`` to this process at the first test batch."""

    def __init__(self, signal: int) -> None:
        self.signal = signal

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        os.kill(os.getpid(), self.signal)


class KillInValidation(L.Callback):
    """SIGKILL this process when the validation of epoch ``epoch`` starts (after that epoch's last step)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
