"""The Lightning module every monatune task builds on: a tuned timm backbone and its recipe.

A task (classification here; detection and segmentation build on the same base) says how
to build its network and what its loss and metric are. The base does what the release's
recipes share: load the pretrained file, apply the tuning method, AdamW with the weight-decay
groups the config asks for (timm's: none on 1-D parameters and position tables; or the release's
mmcv ``paramwise_cfg`` rule, :mod:`monatune.engine.decay`), a warm-up + cosine /
step / poly schedule stepped every iteration (timm's schedulers), small resumable
checkpoints, and the RNG state a mid-epoch resume needs to end with the same weights.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler
from torch import nn

from ..checkpoints import load_adapter, load_pretrained
from ..compiling import compile_module, compile_options
from ..memory import set_activation_checkpointing, set_frozen_precision
from ..methods import resolve_method
from ..params import ParamReport, count_parameters
from .decay import check_paramwise, mmcv_param_groups

__all__ = ["TunedModule", "SCHEDULES", "resolve_options"]

SCHEDULES = ("cosine", "step", "poly", "constant")
FROZEN_PRECISIONS = ("bf16", "fp16")
_RNG_KEY = "monatune_rng"
# a dense network's top-level part -> the release's (mmdet 2.x / mmseg 0.x) name for it, for ``paramwise``
_RELEASE_PARTS = {"rpn": "rpn_head", "roi_heads": "roi_head", "head": "bbox_head", "aux_head": "auxiliary_head"}


def _existing_file(path: str | None, what: str) -> str | None:
    if path is not None and Path(path).is_dir():
        raise ValueError(f"{what} '{path}' is a directory; give the checkpoint file in it (.pth, .pt, .bin, .safetensors)")
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"{what} '{path}' does not exist; check the path in your config (or leave it out)")
    return path


TASK_HEAD_FILE = "task_head.safetensors"


def _task_head_tensors(network: nn.Module, part: nn.Module) -> dict[str, torch.Tensor]:
    inside = {id(t) for t in part.state_dict(keep_vars=True).values()}
    trainable = {id(p) for p in network.parameters() if p.requires_grad}
    buffers = {id(b) for b in network.buffers()}
    return {
        n: t for n, t in network.state_dict(keep_vars=True).items()
        if id(t) not in inside and (id(t) in trainable or id(t) in buffers)
    }  # fmt: skip


def task_head_state(network: nn.Module, part: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors and buffers (BatchNorm statistics) of ``network`` outside its tuned part
    (a detector's neck and heads)."""
    return {n: t.detach().cpu().contiguous() for n, t in _task_head_tensors(network, part).items()}


def load_task_head(network: nn.Module, part: nn.Module, adapter_dir: str | Path) -> None:
    """Load ``task_head.safetensors`` of an adapter directory (if the task has one) into ``network``."""
    from safetensors.torch import load

    from ..checkpoints.adapter import check_dtypes, read_adapter_file

    expected = task_head_state(network, part)
    path = Path(adapter_dir) / TASK_HEAD_FILE
    if not expected:
        return
    data = read_adapter_file(adapter_dir, TASK_HEAD_FILE)
    if data is None:
        raise FileNotFoundError(f"'{adapter_dir}' has no {TASK_HEAD_FILE}: it holds the backbone's adapter but not this task's heads")
    tensors = load(data)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"'{path}' does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}, misshapen {wrong[:3]} "
            "(another detector, neck or class count?)"
        )
    targets = _task_head_tensors(network, part)
    check_dtypes(tensors, targets, str(path))
    with torch.no_grad():
        for k, v in tensors.items():
            targets[k].copy_(v)


def resolve_options(
    method: str, method_options: dict[str, Any] | None, method_options_by_method: dict[str, dict[str, Any]] | None
) -> dict[str, Any]:
    """The options ``method`` is applied with: its entry of ``method_options_by_method`` updated by
    ``method_options``; every entry is checked (``ValueError`` naming the method, option and value).

    Idempotent on its own result (``resolve_options(m, resolve_options(m, o, b), b)`` is the same), so
    a run's saved hyperparameters and its config resolve alike.
    """
    by_method = method_options_by_method or {}
    if not isinstance(by_method, Mapping):
        raise ValueError(
            f"`method_options_by_method` must map method names to their options, got {method_options_by_method!r}"
        )
    for name, entry in by_method.items():
        try:  # an unknown method, option or value fails here, whichever method runs
            resolve_method(name, entry)
        except ValueError as e:
            raise ValueError(f"method_options_by_method.{name}: {e}") from None
    if method_options is not None and not isinstance(method_options, Mapping):
        resolve_method(method, method_options)  # raises: an unknown method, or options that are no mapping
    options = {**(by_method.get(method) or {}), **(method_options or {})}
    resolve_method(method, options)  # unknown method or option: fail before any work
    return options


class TunedModule(L.LightningModule):
    """Base of the monatune tasks: a timm backbone, a tuning method, an optimizer recipe.

    Args:
        backbone: timm model name, e.g. ``swin_large_patch4_window7_224``.
        method: Tuning method (``monatune.METHODS``).
        method_options: Options of the method, e.g. ``{"bottleneck": 32}``; they update the
            method's entry of ``method_options_by_method``.
        method_options_by_method: Per-method options the chosen method starts from (``{"mona":
            {"init": "default"}, "lorand": {"branches": 4, "shared_kernel": false}}``), so that a
            task config carries a release's per-method settings while a method config, composed
            after it, sets ``method_options: {}``. Every entry is checked. The resolved options
            (this entry updated by ``method_options``) are what ``method_options`` holds, what the
            saved hyperparameters record and what the method is applied with.
        pretrained: Weights to start from: an official Swin ``.pth``, a timm ``.safetensors``/``.bin``.
        model_kwargs: Extra ``timm.create_model`` arguments (e.g. ``img_size``, ``depths``).
        drop_path_rate: Stochastic depth of the backbone.
        drop_path_by_method: Per-method drop-path rates that replace ``drop_path_rate`` (``{"mona": 0.2}``).
        adapter: An adapter directory (``monatune.save_adapter``) to start from or evaluate.
        lr: Base learning rate (of AdamW).
        lr_scale: Per-method multipliers of ``lr``, e.g. ``{"mona": 2.0}`` (the release's recipe
            for Flowers and Pets).
        weight_decay: AdamW weight decay. By default (``paramwise`` unset) timm's rule: none on
            1-D parameters (norms, biases, Mona's scales) and the backbone's ``no_weight_decay()``
            (position tables).
        paramwise: The release's rule instead, mmcv 1.x's ``paramwise_cfg``: ``custom_keys`` (name
            substring -> ``decay_mult``, or ``{decay_mult, lr_mult}``; longest key first),
            ``norm_decay_mult``, ``dwconv_decay_mult``, ``bias_decay_mult``, matched against
            :meth:`release_name` (see :mod:`monatune.engine.decay`).
        paramwise_by_method: Per-method ``paramwise`` that replaces it (the release's ADE20K Mona
            config adds a ``backbone`` key).
        betas: AdamW betas.
        schedule: ``cosine``, ``step`` (``milestones`` in epochs, ×``gamma``), ``poly`` or ``constant``.
        warmup_epochs: Linear warm-up length in epochs (fractions allowed).
        warmup_steps: Warm-up length in iterations (overrides ``warmup_epochs`` when set).
        warmup_lr_ratio: Warm-up starts at ``lr * warmup_lr_ratio``.
        min_lr_ratio: Cosine and poly schedules end at ``lr * min_lr_ratio``.
        milestones: Epochs at which the ``step`` schedule multiplies the lr by ``gamma``.
        gamma: Factor of the ``step`` schedule.
        poly_power: Power of the ``poly`` schedule.
        activation_checkpointing: Recompute the backbone's blocks in backward instead of storing
            their activations (``monatune.memory``; same results, about one more forward pass).
        frozen_precision: ``bf16`` or ``fp16``: run the frozen part of the backbone in that
            type, adapters and heads in float32 (``monatune.memory``); not with ``full``.
        compile: ``torch.compile`` the network (a detector: its backbone and FPN): ``true`` or a mapping of
            :class:`monatune.compiling.CompileOptions` (``backend``, ``mode``, ``dynamic``, ``size_buckets``,
            ``recompile_limit``, inductor ``options``). Same results as eager up to float rounding; a
            detector with ``size_buckets`` pads its batches more (:mod:`monatune.compiling`).
    """

    strict_loading = False  # resumable checkpoints hold only what trains (see on_save_checkpoint)

    def __init__(
        self,
        backbone: str,
        *,
        method: str = "mona",
        method_options: dict[str, Any] | None = None,
        method_options_by_method: dict[str, dict[str, Any]] | None = None,
        pretrained: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        drop_path_rate: float = 0.0,
        drop_path_by_method: dict[str, float] | None = None,
        adapter: str | None = None,
        lr: float = 1e-4,
        lr_scale: dict[str, float] | None = None,
        weight_decay: float = 0.05,
        paramwise: dict[str, Any] | None = None,
        paramwise_by_method: dict[str, dict[str, Any]] | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        schedule: str = "cosine",
        warmup_epochs: float = 0.0,
        warmup_steps: int | None = None,
        warmup_lr_ratio: float = 1e-3,
        min_lr_ratio: float = 0.01,
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        poly_power: float = 1.0,
        activation_checkpointing: bool = False,
        frozen_precision: str | None = None,
        compile: bool | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
        if lr <= 0:
            raise ValueError(f"`lr` must be positive, got {lr}")
        options = resolve_options(method, method_options, method_options_by_method)  # fails before any work
        if frozen_precision is not None:
            if frozen_precision not in FROZEN_PRECISIONS:
                raise ValueError(f"unknown frozen_precision {frozen_precision!r}; choose from {FROZEN_PRECISIONS}")
            if method == "full":
                raise ValueError("frozen_precision needs a frozen backbone; method 'full' trains every weight")
        self.activation_checkpointing, self.frozen_precision = activation_checkpointing, frozen_precision
        self.compile_options = compile_options(compile)
        self.backbone_name = backbone
        self.method = method
        self.method_options = options
        self.pretrained = _existing_file(pretrained, "pretrained weights file")
        if adapter is not None and not Path(adapter).is_dir():
            raise FileNotFoundError(f"adapter directory '{adapter}' does not exist")
        self.adapter_path = adapter
        self.model_kwargs = dict(model_kwargs or {})
        self.drop_path_rate = (drop_path_by_method or {}).get(method, drop_path_rate)
        self.lr = lr * (lr_scale or {}).get(method, 1.0)
        self.weight_decay, self.betas = weight_decay, tuple(betas)
        paramwise = (paramwise_by_method or {}).get(method, paramwise)
        self.paramwise = check_paramwise(paramwise) if paramwise is not None else None
        self.schedule, self.milestones, self.gamma, self.poly_power = schedule, list(milestones or []), gamma, poly_power
        self.warmup_epochs, self.warmup_steps = warmup_epochs, warmup_steps
        self.warmup_lr_ratio, self.min_lr_ratio = warmup_lr_ratio, min_lr_ratio
        self.model: nn.Module | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self.save_hyperparameters()
        if options != dict(method_options or {}):  # method_options_by_method added some: record the options the
            # method is applied with (a checkpoint's hparams rebuild the same model; a resume compares them)
            self.hparams["method_options"] = dict(options)
            self._hparams_initial["method_options"] = dict(options)  # what loggers write (hparams.yaml)

    # -- building -------------------------------------------------------------------------
    def build_network(self) -> nn.Module:
        """Create the task's network (untuned); subclasses implement it."""
        raise NotImplementedError

    def _classes_from_data(self) -> Any:
        """The trainer's data module (``None`` without one), after taking ``num_classes`` (when not
        given) and ``classes`` from it; a task needs a class count from one or the other."""
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(self, "num_classes", None) is None:
            self.num_classes = getattr(data, "num_classes", None)
        if not self.num_classes:
            raise ValueError("`num_classes` is not set and the data module does not provide it")
        provided = getattr(data, "num_classes", None)
        if provided and self.num_classes < provided:
            names = list(getattr(data, "classes", None) or [])
            shown = f" ({', '.join(map(str, names[:5]))}{', ...' if len(names) > 5 else ''})" if names else ""
            raise ValueError(
                f"model.init_args.num_classes is {self.num_classes} but the data has {provided} classes{shown}; "
                f"leave num_classes out to take the data's count, or set it to {provided}"
            )
        self.classes = list(getattr(data, "classes", None) or []) or None
        return data

    def tuned_part(self, network: nn.Module) -> nn.Module:
        """The module the method is applied to and adapters are saved from (default: all of it)."""
        return network

    def compiled_part(self, network: nn.Module) -> nn.Module:
        """The module the ``compile`` option compiles (default: all of it; detectors: the backbone and FPN,
        since proposal sampling and NMS change shape with the data)."""
        return network

    def use_size_buckets(self, network: nn.Module, buckets: int | tuple[int, ...] | None) -> None:
        """Make the network pad its batches to ``buckets`` (tasks with variable input sizes override it)."""

    def configure_model(self) -> None:
        """Build the network, load the pretrained file, apply the method, load an adapter (once)."""
        if self.model is not None:
            return
        network = self.build_network()
        part = self.tuned_part(network)
        if self.pretrained:
            load_pretrained(part, self.pretrained)
        from ..tuning import apply  # late import: tuning imports timm model registries

        apply(part, self.method, **self.method_options)
        if self.adapter_path:
            load_adapter(part, self.adapter_path)
            load_task_head(network, part, self.adapter_path)
        if self.activation_checkpointing:
            set_activation_checkpointing(part)
        if self.frozen_precision:
            set_frozen_precision(part, self.frozen_precision)
        if self.compile_options is not None:
            self.use_size_buckets(network, self.compile_options.size_buckets)
            compile_module(self.compiled_part(network), self.compile_options)
        self.model = network

    @property
    def tuned(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("the network is built in configure_model(); call it (or start a Trainer) first")
        return self.tuned_part(self.model)

    def param_report(self) -> ParamReport:
        return count_parameters(self.tuned)

    # -- optimisation ---------------------------------------------------------------------
    def release_name(self, name: str) -> str:
        """The name the release's model gives the parameter ``name`` of the network (for ``paramwise``).

        The release's mmdet/mmseg/mmcls models name their parts ``backbone``, ``neck``, ``rpn_head``,
        ``roi_head``, ``bbox_head``, ``decode_head``, ``auxiliary_head`` and ``head``; mmcv's rule
        matches key substrings against those full names. So the tuned backbone's parameters go under
        ``backbone.`` (their names inside it are timm's, which are the release's for Swin, and a
        Mona's LayerNorm is ``norm`` in both), the rest of a detector's ``backbone`` (the FPN) under
        ``neck.``, and a head's first name component becomes the release's (``roi_heads`` ->
        ``roi_head``, ``rpn`` -> ``rpn_head``, a RetinaNet's ``head`` -> ``bbox_head``, ``aux_head``
        -> ``auxiliary_head``; a classifier's ``head`` stays ``head``). Names inside the heads stay
        monatune's: none contains ``norm`` (their BatchNorms are torchvision's ``Conv2dNormActivation``
        children ``1``, the release's ConvModule ``bn``), which ``tests/engine/test_decay.py`` checks.
        """
        prefix = next(n for n, m in self.model.named_modules() if m is self.tuned)
        name = name.lstrip(".")
        if not prefix:  # the whole network is tuned (a classifier): only its classifier is outside the backbone
            return name if name.startswith("head.") else f"backbone.{name}"
        if name.startswith(prefix + "."):
            return f"backbone.{name[len(prefix) + 1:]}"
        if name.startswith("backbone."):
            return f"neck.{name[len('backbone.'):]}"
        first, _, rest = name.partition(".")
        return f"{_RELEASE_PARTS.get(first, first)}.{rest}"

    def configure_optimizers(self) -> dict[str, Any]:
        if self.paramwise is not None:
            groups = mmcv_param_groups(self.model, self.lr, self.weight_decay, self.paramwise, self.release_name)
        else:
            prefix = next(f"{n}." for n, m in self.model.named_modules() if m is self.tuned).lstrip(".")
            skip = {prefix + name for name in getattr(self.tuned, "no_weight_decay", lambda: set())()}
            groups = param_groups_weight_decay(self.model, self.weight_decay, no_weight_decay_list=skip)
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError(f"method {self.method!r} leaves nothing to train")
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        total, per_epoch = self._schedule_length()
        warmup = self.warmup_steps if self.warmup_steps is not None else round(self.warmup_epochs * per_epoch)
        common = dict(warmup_t=warmup, warmup_lr_init=self.lr * self.warmup_lr_ratio, t_in_epochs=False)
        # as in mmcv (the release): the decay curve spans the whole run, warm-up included, and
        # warm-up ramps linearly from lr * warmup_lr_ratio
        if self.schedule == "cosine":
            scheduler = CosineLRScheduler(optimizer, t_initial=total, lr_min=self.lr * self.min_lr_ratio, **common)
        elif self.schedule == "poly":
            scheduler = PolyLRScheduler(
                optimizer, t_initial=total, power=self.poly_power, lr_min=self.lr * self.min_lr_ratio, **common
            )
        else:
            # timm decays once num_updates + 1 reaches a boundary; +1 makes update m * per_epoch the first decayed
            decay = [m * per_epoch + 1 for m in self.milestones] if self.schedule == "step" else [total + 2]
            scheduler = MultiStepLRScheduler(optimizer, decay_t=decay, decay_rate=self.gamma, **common)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _schedule_length(self) -> tuple[int, int]:
        """(optimiser steps of the run, steps per epoch).

        ``Trainer.estimated_stepping_batches`` would give this, but calling it here sets up the
        training loader before a checkpoint's loader position is restored, so a mid-epoch resume
        would replay the epoch from its start; the data module's loader is only measured here.
        """
        trainer = self.trainer
        data = trainer.datamodule
        if data is None:
            total = int(trainer.estimated_stepping_batches)
            return total, max(total // max(trainer.max_epochs or 1, 1), 1)
        batches = len(data.train_dataloader())
        limit = trainer.limit_train_batches
        batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        per_epoch = max(math.ceil(batches / trainer.accumulate_grad_batches), 1)
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return trainer.max_steps, per_epoch
        return per_epoch * max(trainer.max_epochs or 1, 1), per_epoch

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        scheduler.step_update(num_updates=self.global_step)  # timm schedulers step by update count

    # -- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable tensors and buffers: the frozen backbone comes from ``pretrained``."""
        frozen = {f"model.{n}" for n, p in self.model.named_parameters() if not p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["monatune"] = {"method": self.method, "backbone": self.backbone_name, "frozen_omitted": len(frozen)}
        checkpoint[_RNG_KEY] = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("monatune", {})
        if info and (info.get("method"), info.get("backbone")) != (self.method, self.backbone_name):
            raise ValueError(
                f"the checkpoint was trained with {info.get('method')} on {info.get('backbone')}, but the config "
                f"says {self.method} on {self.backbone_name}; resume with the config the run started with"
            )
        missing = [
            n for n, p in self.model.named_parameters() if p.requires_grad and f"model.{n}" not in checkpoint["state_dict"]
        ]
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} trained tensors of this model (first: {missing[:3]}); "
                "it belongs to another method or model"
            )
        own = self.state_dict()
        misshapen = [
            f"{k} is {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} here"
            for k, v in checkpoint["state_dict"].items() if k in own and tuple(v.shape) != tuple(own[k].shape)
        ]  # fmt: skip
        if misshapen:
            raise ValueError(
                f"the checkpoint does not fit this model ({len(misshapen)} tensors differ in shape; {misshapen[0]}): the "
                "class count or the method's options changed since the run started; resume with the settings it started with"
            )
        self._rng_to_restore = checkpoint.get(_RNG_KEY)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # the first step after a resume continues the saved RNG
            torch.set_rng_state(self._rng_to_restore["cpu"])
            if self._rng_to_restore["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
            self._rng_to_restore = None
