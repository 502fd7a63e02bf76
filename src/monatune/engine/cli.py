"""``monatune fit | validate | test | predict``: LightningCLI over the task modules and data modules.

LightningCLI (jsonargparse) gives what the experiments need without new code: YAML files
composed in order (``-c task.yaml -c methods/mona.yaml``), ``--a.b value`` overrides, every
Trainer option (devices, precision, strategy, accumulation, clipping) and the resolved
config written next to the outputs. This module adds the run directory around it.
"""
from __future__ import annotations

import csv
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
from jsonargparse import ActionYesNo
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from .callbacks import AdapterCheckpoint, PredictionWriter, RunSummary
from .resume import ResumeCheckpoint, StopOnSignal, TrimResumedMetrics
from .module import TunedModule

__all__ = ["MonatuneCLI", "run_lightning_cli", "SUBCOMMANDS"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def expand_overrides(argv: Sequence[str]) -> list[str]:
    """``model.lr=1e-4`` -> ``--model.lr=1e-4`` (the ``--a.b value`` form passes as it is)."""
    return [f"--{a}" if _OVERRIDE.match(a) else a for a in argv]


def _default_run_dir(config: Any) -> Path:
    names = [Path(str(c)).stem for c in (config.get("config") or [])]
    stem = names[0] if names else str(config["model"]["init_args"].get("backbone", "run"))
    return Path("runs") / f"{stem}-{config['model']['init_args'].get('method', 'mona')}"


def _keep_metrics(logger: CSVLogger) -> None:
    """Keep the rows of a resumed run's ``metrics.csv``: Lightning's CSV writer deletes the file when it starts.

    They are written back at once; :class:`TrimResumedMetrics` drops those of the steps the resumed run redoes.
    """
    path = Path(logger.log_dir) / "metrics.csv"
    if rank_zero_only.rank != 0 or not path.is_file():
        return
    with path.open(newline="") as f:
        rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    logger.experiment.metrics[:0] = rows
    logger.save()


# what the trained tensors depend on: a resumed run must keep these as the run started with them
_STRUCTURE = ("backbone", "method", "method_options", "num_classes", "multilabel", "model_kwargs")


def _check_resumable(path: Path, model: Any) -> None:
    """Refuse, in one line and before any work, a damaged checkpoint or one another model config wrote."""
    import torch

    try:  # Lightning's checkpoint holds only tensors and plain containers
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (torch raises RuntimeError, UnpicklingError, EOFError, ... for a damaged file)
        reason = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
        raise ValueError(
            f"cannot resume: '{path}' is damaged ({reason}); remove it and add --resume to start the run again "
            "from the beginning"
        ) from None
    saved = state.get("hyper_parameters") or {}
    now = model.init_args.as_dict() if hasattr(model.init_args, "as_dict") else dict(model.init_args)
    plain = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731  (tuples and lists compare equal)
    if saved.get("_class_path") not in (None, model.class_path):
        raise ValueError(f"cannot resume: the run is a {saved['_class_path']}, the config says {model.class_path}")
    from .module import resolve_options

    for args in (saved, now):  # compare the options the method runs with (a task config may set them per method)
        if args.get("method_options_by_method"):
            args["method_options"] = resolve_options(
                args.get("method"), args.get("method_options"), args["method_options_by_method"]
            )
    for key in _STRUCTURE:
        if key in saved and key in now and plain(saved[key]) != plain(now[key]):
            raise ValueError(
                f"cannot resume: the run started with model.init_args.{key}={plain(saved[key])!r}, the config now says "
                f"{plain(now[key])!r}; resume with the settings it started with (its config.yaml), or fit into a new --run_dir"
            )


class MonatuneCLI(LightningCLI):
    """LightningCLI with monatune's run directory, checkpoints and results."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        import monatune.data  # noqa: F401  (registers the data modules and tasks for short class names)
        import monatune.tasks  # noqa: F401

        super().__init__(
            TunedModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            auto_configure_optimizers=False,
            trainer_defaults={"use_distributed_sampler": False, "log_every_n_steps": 10},
            parser_kwargs={"prog": "monatune", "description": "Train and evaluate tuned vision backbones."},
            args=list(args) if args is not None else None,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=Optional[str], default=None, help="run directory (default runs/<config>-<method>)")
        parser.add_argument(
            "--resume", action=ActionYesNo, default=False, help="fit: continue the run in --run_dir from its last checkpoint"
        )
        parser.add_argument("--save_every_n_steps", type=int, default=100, help="fit: steps between resumable checkpoints")
        parser.add_argument(
            "--adapter_choice", type=Literal["best", "last"], default="best",
            help="validate/test/predict: the run's adapter-last/ (final epoch; the paper configs' choice, as the "
            "release reports its final checkpoint) or adapter-best/ (best validation epoch; optimistic where the "
            "validation split is the test split, as in the paper configs)",
        )

    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        config = self.config[sub]
        run_dir = Path(config.run_dir) if config.run_dir else _default_run_dir(config)
        self.run_dir = run_dir
        if sub == "fit":
            last = run_dir / "checkpoints" / "last.ckpt"
            if config.resume:
                if config.ckpt_path is None:
                    if last.is_file():
                        config.ckpt_path = str(last)
                        _check_resumable(last, config.model)
                    elif (run_dir / "results.json").exists() or not (run_dir / "config.yaml").is_file():
                        raise FileNotFoundError(f"cannot resume: '{last}' does not exist (is --run_dir right?)")
                    else:  # stopped before its first checkpoint: nothing to continue from
                        warnings.warn(f"'{run_dir}' stopped before its first checkpoint; training starts from the beginning")
            elif (run_dir / "checkpoints").exists() or (run_dir / "results.json").exists():
                raise ValueError(
                    f"'{run_dir}' already holds a run; add --resume to continue it, or choose another --run_dir"
                )
            self.out_dir = run_dir
        else:
            self.out_dir = run_dir / sub
            init = config.model.init_args
            chosen = run_dir / f"adapter-{config.get('adapter_choice') or 'best'}"
            if init.get("adapter") is None and config.get("ckpt_path") is None:
                if not chosen.is_dir():
                    raise FileNotFoundError(
                        f"nothing trained to {sub}: '{chosen}' does not exist. Give the --run_dir of a finished fit, "
                        "or the weights: --model.init_args.adapter DIR or --ckpt_path FILE"
                    )
                init.adapter = str(chosen)  # the run's best (or, with --adapter_choice last, final) adapter
        config.trainer.default_root_dir = str(self.out_dir)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:
            # jsonargparse lists what the model's or data's __init__ raised among the "Union subtypes" it
            # tried, under the whole config; the user needs that error alone (e.g. "data folder 'x' does not exist")
            cause = e.__cause__
            if str(e).startswith("Does not validate against any of the Union subtypes") and isinstance(cause, Exception):
                raise cause from None  # a ValueError is reported in one line; anything else keeps its own traceback
            raise

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        sub, config = self.subcommand, self.config_init[self.subcommand]
        callbacks: list[L.Callback] = [RunSummary(), StopOnSignal()]
        if sub == "fit":
            callbacks += [ResumeCheckpoint(config.save_every_n_steps), AdapterCheckpoint()]
            if config.resume:
                callbacks.append(TrimResumedMetrics())
        if sub == "predict":
            callbacks.append(PredictionWriter())
        self.trainer_defaults["callbacks"] = callbacks
        warnings.filterwarnings("ignore", message=r".*exists and is not empty.*")  # a resumed run appends to its logs
        if config.trainer.get("logger") in (None, True):
            metrics = CSVLogger(self.out_dir, name="", version="")
            if sub == "fit" and config.resume:
                _keep_metrics(metrics)
            kwargs["logger"] = [
                metrics,
                TensorBoardLogger(self.out_dir, name="tensorboard", version="", default_hp_metric=False),
            ]
        return super().instantiate_trainer(**kwargs)


def run_lightning_cli(argv: Sequence[str]) -> MonatuneCLI:
    """Run ``monatune <subcommand> ...``; ``argv`` starts with the subcommand."""
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    return MonatuneCLI(expand_overrides(argv))
