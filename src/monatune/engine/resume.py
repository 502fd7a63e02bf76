"""How a run stops and resumes: its resumable checkpoint, stops by signal, and its metrics after a restart.

- :class:`ResumeCheckpoint`: ``checkpoints/last.ckpt``, Lightning's full training state
  (trainable tensors, optimiser, schedule, loops, data position, RNG), for ``--resume``.
- :class:`StopOnSignal`: SIGTERM or Ctrl-C stop at a step boundary, with the signal's exit status.
- :class:`TrimResumedMetrics`: ``metrics.csv`` keeps one row per step after a resume.
"""
from __future__ import annotations

import csv
import functools
import io
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..atomic import write_file

__all__ = ["ResumeCheckpoint", "StopOnSignal", "TrimResumedMetrics"]


class ResumeCheckpoint(ModelCheckpoint):
    """``<run>/checkpoints/last.ckpt`` every ``every_n_train_steps`` steps and at every epoch's end.

    A save after a step holds the state at the end of that step, but Lightning writes the step's row of
    ``metrics.csv`` only after the callbacks' ``on_train_batch_end``; a checkpoint that appeared before the
    row would, after a kill in between, resume past a step whose row was never written. So that save goes
    to ``last.ckpt.pending`` and is renamed over ``last.ckpt`` (one atomic step) at the next hook, once the
    row is on disk; a kill before that leaves the previous checkpoint, and the resumed run redoes the step.
    """

    PENDING_SUFFIX = ".pending"

    def __init__(self, every_n_train_steps: int = 100) -> None:
        super().__init__(save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps)
        self._defer = False
        self._pending: tuple[str, str] | None = None

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if not self._defer:
            super()._save_checkpoint(trainer, filepath)
            return
        super()._save_checkpoint(trainer, filepath + self.PENDING_SUFFIX)
        self._last_checkpoint_saved = filepath
        self._pending = (filepath + self.PENDING_SUFFIX, filepath)

    def _commit(self, trainer: L.Trainer) -> None:
        """Put a deferred save in place (every process keeps its record; the main process renames the file)."""
        if self._pending is not None:
            pending, target = self._pending
            self._pending = None
            if trainer.is_global_zero and Path(pending).is_file():
                os.replace(pending, target)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._commit(trainer)  # the previous step's metrics row is written by now

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero:  # a deferred save a kill never put in place
            for leftover in Path(self.dirpath).glob(f"*{self.PENDING_SUFFIX}"):
                leftover.unlink(missing_ok=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning resumes a checkpoint taken between a step and the validation that follows it as if that
        # validation had run, and skips it; so none is taken there (the save after the validation covers it).
        # Lightning has no public test for "validation follows this step".
        loop = trainer.fit_loop
        if loop._data_fetcher is not None and loop.epoch_loop._should_check_val_fx(loop._data_fetcher):
            return
        self._defer = True
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._defer = False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._commit(trainer)
        # ModelCheckpoint saves either every n steps or every epoch; a resumable run wants both
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._commit(trainer)
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning stops a signalled fit between two steps (SIGTERMException); the state there is a step
        # boundary, what --resume needs (a deferred save of the step before is put in place: its metrics row
        # is written). Any other exception may come mid-step: the last checkpoint stays, and a deferred save
        # is dropped (its step's metrics row may not have been written).
        if isinstance(exception, SIGTERMException):
            self._commit(trainer)
        elif self._pending is not None:
            if trainer.is_global_zero:
                Path(self._pending[0]).unlink(missing_ok=True)
            self._pending = None
        if isinstance(exception, SIGTERMException) and trainer.training and not trainer.sanity_checking:
            if not self._should_skip_saving_checkpoint(trainer):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class TrimResumedMetrics(Callback):
    """A resumed fit redoes the steps after its checkpoint: drop their rows from ``metrics.csv`` (one row per step)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            path = Path(logger.log_dir or "") / "metrics.csv" if isinstance(logger, CSVLogger) else None
            if path is None or not path.is_file():
                continue
            logger.save()
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                fields, rows = reader.fieldnames or [], list(reader)
            kept = [r for r in rows if r.get("step") in (None, "") or int(float(r["step"])) < trainer.global_step]
            if len(kept) < len(rows):
                text = io.StringIO(newline="")
                writer = csv.DictWriter(text, fieldnames=fields)
                writer.writeheader()
                writer.writerows(kept)
                write_file(path, text.getvalue().encode())


class StopOnSignal(Callback):
    """A stop by signal ends the command with the signal's exit status, after what ``--resume`` needs is saved.

    Lightning turns SIGTERM (SLURM, ``timeout``, ``docker stop``) into a stop at the next step boundary
    (``SIGTERMException``); this callback makes a first Ctrl-C do the same (a second stops at once) and
    labels the exception with the signal, which the CLI reports and exits with (128 + signal number).
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, functools.partial(self._on_sigint, trainer))

    def _on_sigint(self, trainer: L.Trainer, signum: int, frame: Any) -> None:
        if self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop at once
        self.signal = signal.SIGINT
        print("\nCtrl-C: stopping after this step (press it again to stop at once) ...", file=sys.stderr, flush=True)
        # Lightning's graceful stop; it has no public switch for it (received_sigterm is read-only)
        trainer._signal_connector.received_sigterm = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            exception.signal = self.signal or signal.SIGTERM  # type: ignore[attr-defined]
            exception.step = trainer.global_step  # type: ignore[attr-defined]
