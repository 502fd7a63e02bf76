"""How many parameters a (tuned) model has, and how many train."""
from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .tuning import adapter_modules, get_state, model_name

__all__ = ["ParamReport", "count_parameters", "TaskParamReport", "count_task_parameters", "count_config_parameters"]


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


# -- whole task models, from experiment configs ---------------------------------------------------

# Class counts of the data layouts whose class list is fixed, so that a config can be counted
# without its data folder. Layouts that read their classes from the folder (imagefolder, release,
# masks, COCO-layout sets other than COCO itself) need `classes` in the config or `num_classes`.
_KNOWN_CLASS_COUNTS = {
    "coco": 80,  # COCO 2017's detection categories, as instances_train2017.json lists them
    "voc": 20,  # monatune.data.VOC_CLASSES
    "voc2007": 20,
    "ade20k": 150,  # monatune.data.ADE20K_CLASSES
    "flowers102": 102,
    "pets": 37,
}


@dataclass
class TaskParamReport:
    """Parameters of a task model (backbone, adapter, neck, heads), as :func:`count_task_parameters` gives them."""

    task: str  # the task class, e.g. ObjectDetector
    network: str  # the network class, e.g. CascadeMaskRCNN
    backbone_name: str  # the timm name
    method: str
    num_classes: int
    classes_from: str  # where the class count came from
    total: int
    trainable: int
    backbone: int  # the tuned backbone, its adapters included
    adapter: int  # parameters inside adapter modules
    parts: dict[str, dict[str, int]] = field(default_factory=dict)  # part -> {"total": n, "trainable": n}

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trainable_percent": round(self.trainable_percent, 4)}

    def __str__(self) -> str:
        lines = [
            f"{self.task}: {self.network} on {self.backbone_name} [{self.method}], "
            f"{self.num_classes} classes ({self.classes_from})",
            f"trainable {self.trainable:,} of {self.total:,} ({self.trainable_percent:.2f}%)",
            f"  {'part':<16}{'total':>14}{'trainable':>14}",
        ]
        for name, counts in self.parts.items():
            note = f"   of which adapter {self.adapter:,}" if name == "backbone" and self.adapter else ""
            lines.append(f"  {name:<16}{counts['total']:>14,}{counts['trainable']:>14,}{note}")
        return "\n".join(lines)


def _part_owners(task: Any, network: nn.Module) -> dict[int, str]:
    """The part each parameter of ``network`` counts in (by ``id``); the first claim wins."""
    tuned = task.tuned_part(network)
    state = get_state(tuned)
    claims: list[tuple[str, nn.Module | None]] = [("head", tuned.get_submodule(h)) for h in (state.head if state else [])]
    claims.append(("backbone", tuned))  # a classifier's head is claimed above, so not counted here
    roi = getattr(network, "roi_heads", None)
    if hasattr(roi, "stages"):  # the Cascade: a box head and a mask head per stage
        claims += [(f"box_head_{i}", stage) for i, stage in enumerate(roi.stages, 1)]
        claims += [(f"mask_head_{i}", head) for i, head in enumerate(getattr(roi, "mask_heads", None) or [], 1)]
    elif roi is not None:  # torchvision's RoIHeads
        for name in ("box_head", "box_predictor", "mask_head", "mask_predictor"):
            claims.append((name.replace("predictor", "head"), getattr(roi, name, None)))
    # what is left of the network's children: a detector's FPN (around the tuned body) and a ViT's
    # simple pyramid are its neck; RPN, heads, decode and auxiliary heads keep their names
    neck = {"backbone", "pyramid"}
    claims += [("neck" if name in neck else name, child) for name, child in network.named_children()]
    owners: dict[int, str] = {}
    for part, module in claims:
        for p in module.parameters() if module is not None else ():
            owners.setdefault(id(p), part)
    return owners


def count_task_parameters(task: Any, *, classes_from: str = "the model") -> TaskParamReport:
    """Count a built task model's parameters by part.

    Parts: ``backbone`` (the tuned backbone with its adapters and, for dense backbones, its output
    norms), a detector's ``neck`` (FPN), ``rpn``, ``box_head``/``mask_head`` (the Cascade:
    ``box_head_1..3``, ``mask_head_1..3``) or ``head`` (RetinaNet, FCOS), a segmenter's
    ``decode_head`` and ``aux_head``, a classifier's ``head``. Works on the meta device.

    Args:
        task: A :class:`~monatune.engine.TunedModule` whose network is built (``configure_model()``).
        classes_from: Where its class count came from, for the report.
    """
    network = task.model
    if network is None:
        raise RuntimeError("the task's network is not built; call configure_model() first")
    owners = _part_owners(task, network)
    parts: dict[str, dict[str, int]] = {}
    for p in network.parameters():  # module order: backbone first, heads last
        counts = parts.setdefault(owners[id(p)], {"total": 0, "trainable": 0})
        counts["total"] += p.numel()
        counts["trainable"] += p.numel() if p.requires_grad else 0
    parts = {name: c for name, c in parts.items() if c["total"] or name == "backbone"}
    backbone = parts.get("backbone", {"total": 0})["total"]
    return TaskParamReport(
        task=type(task).__name__,
        network=type(network).__name__,
        backbone_name=task.backbone_name,
        method=task.method,
        num_classes=int(task.num_classes),
        classes_from=classes_from,
        total=sum(c["total"] for c in parts.values()),
        trainable=sum(c["trainable"] for c in parts.values()),
        backbone=backbone,
        adapter=count_parameters(task.tuned).adapter,
        parts=parts,
    )


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device; buffers and other tensors stay.

    ``torch.device("meta")`` would put every tensor there, and the tasks build their torchmetrics
    metrics (which read tensor values) with their networks. This is accelerate's
    ``init_empty_weights()``, written out: accelerate is not a dependency.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _yaml_mapping(path: Path) -> dict[str, Any]:
    import yaml

    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config '{path}' is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(content, dict):
        raise ValueError(f"config '{path}' is not a mapping of `trainer`, `model` and `data` sections")
    return content


def _import_class(class_path: str, default_module: str) -> type | None:
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module or default_module), name, None)
    except ImportError:
        return None


def task_class(configs: Sequence[Path]) -> type:
    """The task class the configs name (the last ``model.class_path`` wins), checked before any parsing."""
    from .engine.module import TunedModule

    class_path, where = None, None
    for path in configs:
        model = _yaml_mapping(path).get("model")
        if isinstance(model, dict) and model.get("class_path"):
            class_path, where = str(model["class_path"]), path
    if class_path is None:
        raise ValueError(f"no `model.class_path` in {', '.join(map(str, configs))}; a task config names "
                         "monatune.tasks.ImageClassifier, ObjectDetector or SemanticSegmenter")  # fmt: skip
    cls = _import_class(class_path, "monatune.tasks")
    if not (isinstance(cls, type) and issubclass(cls, TunedModule)):
        raise ValueError(f"config '{where}' names model class {class_path!r}, which is not a monatune task; "
                         "choose monatune.tasks.ImageClassifier, ObjectDetector or SemanticSegmenter")  # fmt: skip
    return cls


def _init_arguments(cls: type) -> list[str]:
    """The keyword arguments ``cls(...)`` takes, following ``**kwargs`` up to the base class that names them."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(vars(klass)["__init__"]).parameters.values())[1:]  # after self
        names += [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def parse_configs(configs: Sequence[Path]) -> Any:
    """The configs parsed exactly as ``monatune fit -c ... -c ...`` parses them, nothing instantiated."""
    import argparse
    import warnings

    from .engine.cli import MonatuneCLI

    class Parsed(Exception):
        pass

    class ConfigReader(MonatuneCLI):
        def init_parser(self, **kwargs: Any) -> Any:
            return super().init_parser(**kwargs, exit_on_error=False)  # raise, so the error is ours to word

        def before_instantiate_classes(self) -> None:
            raise Parsed(self.config["fit"])  # stop before the run directory, the data and the model

    argv = ["fit", *(a for c in configs for a in ("-c", str(c))), "--seed_everything=false"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended.*")
        try:
            ConfigReader(argv)
        except Parsed as parsed:
            return parsed.args[0]
        except argparse.ArgumentError as e:
            raise ValueError(f"cannot read {', '.join(map(str, configs))}: {' '.join(str(e).split())}") from None
    raise AssertionError("MonatuneCLI returned without reaching before_instantiate_classes")


def _class_names(classes: Any) -> list[str]:
    if isinstance(classes, (str, Path)):  # a text file, one name per line
        path = Path(classes).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"class list '{path}' does not exist; check `data.init_args.classes`")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [str(c) for c in classes]


def _data_class_count(data: Any) -> tuple[int, str]:
    """The class count a data config gives, from its ``classes`` or its format's fixed list; no folder read."""
    hint = "set `model.init_args.num_classes` (or --num-classes)"
    if data is None:
        raise ValueError(f"the config has no `num_classes` and no data to take it from; {hint}")
    init = data.init_args.as_dict() if hasattr(data.init_args, "as_dict") else dict(data.init_args or {})
    if init.get("classes"):
        return len(_class_names(init["classes"])), "the data's `classes`"
    fmt = init.get("format")
    if fmt in _KNOWN_CLASS_COUNTS:
        return _KNOWN_CLASS_COUNTS[fmt], f"the {fmt} format's list"
    raise ValueError(f"the class count of data {data.class_path} with format {fmt!r} comes from its folder, "
                     f"which `monatune params` does not read; {hint}")  # fmt: skip


def count_config_parameters(
    configs: Sequence[str | Path],
    *,
    num_classes: int | None = None,
    init_args: dict[str, Any] | None = None,
) -> TaskParamReport:
    """Build the task model experiment configs describe, on the meta device, and count it by part.

    The configs are read as ``monatune fit -c ... -c ...`` reads them (later files win). No weights
    are loaded (``pretrained`` and ``adapter`` are ignored) and no data is read: the class count is
    ``num_classes``, else the config's ``model.init_args.num_classes``, else the data's ``classes``
    or the fixed list of its format (COCO 80, VOC 20, ADE20K 150, Flowers102 102, Pets 37).

    Args:
        configs: YAML files, e.g. a task config then a method config.
        num_classes: Overrides the class count.
        init_args: Overrides of ``model.init_args`` (``{"backbone": "swin_tiny_patch4_window7_224"}``);
            ``method_options`` add to the config's, unless ``method`` changes too.

    Example:
        >>> report = count_config_parameters(["configs/det/coco_cascade_mask_rcnn_swin_b_3x.yaml",
        ...                                   "configs/methods/mona.yaml"])
        >>> report.total, report.trainable
        (148644458, 61899442)
    """
    if isinstance(configs, (str, Path)):  # one file, not a sequence of one-letter names
        configs = [configs]
    paths = [Path(c).expanduser() for c in configs]
    if not paths:
        raise ValueError("give at least one config file (-c configs/det/voc_retinanet_swin_l.yaml)")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"config file '{path}' does not exist")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1):
        raise ValueError(f"`num_classes` must be a positive int, got {num_classes!r}")
    if init_args is not None and not isinstance(init_args, Mapping):
        raise ValueError(f"`init_args` must be a mapping of model.init_args names to values, got {init_args!r}")
    options = (init_args or {}).get("method_options")
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"`method_options` must be a mapping of option names to values, got {options!r}")
    cls = task_class(paths)
    unknown = sorted((k for k in init_args or {} if k not in _init_arguments(cls)), key=str)
    if unknown:
        raise ValueError(f"unknown init_args {unknown} for {cls.__name__}; it takes {_init_arguments(cls)}")
    config = parse_configs(paths)
    init = config.model.init_args.as_dict()
    overrides = {k: v for k, v in (init_args or {}).items() if k != "method_options" or v is not None}
    if "method" in overrides:  # another method: the config's options were its method's
        overrides.setdefault("method_options", {})
    elif "method_options" in overrides:  # the same method: options add to the config's
        overrides["method_options"] = {**(init.get("method_options") or {}), **overrides["method_options"]}
    init.update(overrides, pretrained=None, adapter=None)
    if num_classes is not None:
        init["num_classes"], classes_from = num_classes, "given"
    elif init.get("num_classes") is not None:
        classes_from = "the config's num_classes"
    else:
        init["num_classes"], classes_from = _data_class_count(config.get("data"))
    task = cls(**init)  # checks the method and its options before anything is built
    with parameters_on_meta():
        task.configure_model()
    return count_task_parameters(task, classes_from=classes_from)
