"""The trained network ``monatune export`` starts from: a run directory, or an adapter directory and its pretrained file.

A run directory (``runs/<name>/``: ``config.yaml``, ``adapter-best/``, ``adapter-last/``) is rebuilt as
``monatune test`` rebuilds it: the resolved config names the task and its network, the run's seed
draws the same random weights where no ``pretrained`` file was given, and the chosen adapter (with a
dense task's ``task_head.safetensors``) is loaded on top, its base fingerprint checked.

An adapter directory alone holds the backbone's name, the method, its options and the head
(``adapter_config.json``): a classifier is rebuilt from it and the pretrained file. An adapter of a
dense backbone (a detector's or a segmenter's) also needs the task config that says which heads it
has (``configs=``). No data is read: the class count is the config's, else the trained tensors' (the
classifier's or the heads' rows, solved from two builds on the meta device).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..checkpoints.adapter import CONFIG_NAME, read_adapter
from ..engine.module import TASK_HEAD_FILE, TunedModule
from ..params import parameters_on_meta, parse_configs, task_class
from ..tuning import get_state

__all__ = ["TrainedTask", "load_trained", "TASKS"]

TASKS = {"ImageClassifier": "classification", "SemanticSegmenter": "segmentation",
         "ObjectDetector": "detection", "OrientedDetector": "oriented detection"}  # fmt: skip


@dataclass
class TrainedTask:
    """A built task module with its trained adapter loaded, and where it came from."""

    task: TunedModule
    kind: str  # a value of TASKS
    image_size: tuple[int, int]  # the size the task evaluates at, by its config (or the model's own)
    source: dict[str, Any]  # what was loaded: run / adapter directory, pretrained file, configs, num_classes
    data: dict[str, Any]  # the config's data.init_args (empty without a config)

    @property
    def network(self) -> nn.Module:
        return self.task.model


def _kind(cls: type) -> str:
    for klass in cls.__mro__:
        if klass.__name__ in TASKS:
            return TASKS[klass.__name__]
    raise ValueError(f"{cls.__name__} is a task monatune export does not know; it exports {', '.join(TASKS)}")


def _adapter_dir(path: Path, what: str) -> Path:
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{what} '{path}' holds no adapter ({CONFIG_NAME} is missing)")
    return path


def _file_shapes(task: TunedModule, adapter: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the trained tensors by network key: the adapter file's (under the tuned part) and the heads'."""
    from safetensors import safe_open

    _, tensors = read_adapter(adapter)
    prefix = next(n for n, m in task.model.named_modules() if m is task.tuned)
    shapes = {f"{prefix}.{k}".lstrip("."): tuple(t.shape) for k, t in tensors.items()}
    head = adapter / TASK_HEAD_FILE
    if head.is_file():
        with safe_open(str(head), "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def _class_count(cls: type, init: dict[str, Any], adapter: Path) -> int:
    """The class count the trained tensors were made for: build the network for 2 and for 3 classes on
    the meta device (metrics need 2 or more), and solve for the count from the first tensor whose shape follows it."""
    def shapes(n: int) -> tuple[TunedModule, dict[str, tuple[int, ...]]]:
        task = cls(**{**init, "num_classes": n, "pretrained": None, "adapter": None})
        with parameters_on_meta():
            task.configure_model()
        return task, {k: tuple(v.shape) for k, v in task.model.state_dict().items()}

    task, one = shapes(2)
    two = shapes(3)[1]
    saved = _file_shapes(task, adapter)
    for key, s1 in one.items():
        s2, found = two.get(key), saved.get(key)
        if found is None or s2 is None or s1 == s2 or len(found) != len(s1):
            continue
        dim = next(i for i, (a, b) in enumerate(zip(s1, s2)) if a != b)
        slope = s2[dim] - s1[dim]  # rows per class; s1 has 2 classes' rows
        n = 2 + (found[dim] - s1[dim]) / slope
        if n >= 1 and n == int(n):
            return int(n)
    raise ValueError(
        f"cannot tell the class count from '{adapter}' (no trained tensor of the head follows it); "
        "set model.init_args.num_classes in the config"
    )


def _seed(configs: Sequence[Path]) -> Any:
    """The configs' ``seed_everything`` (the last file's wins; monatune's default 0), read as `monatune fit` reads it."""
    import yaml

    seed: Any = 0
    for path in configs:
        content = yaml.safe_load(path.read_text()) or {}
        if isinstance(content, dict) and "seed_everything" in content:
            seed = content["seed_everything"]
    return seed


def _size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[-1]))


def _default_size(task: TunedModule, kind: str, data: dict[str, Any]) -> tuple[int, int]:
    """The evaluation input size the config gives (classification: the data's image_size or the model's own;
    segmentation: the crop; detection: the test scale, square), padded to a multiple of 32 for dense tasks."""
    if kind == "classification":
        size = _size(data.get("image_size"))
        embed = getattr(task.model, "patch_embed", None)
        if size is None and embed is not None and getattr(embed, "img_size", None) is not None:
            size = _size(tuple(embed.img_size))
        cfg = getattr(task.model, "pretrained_cfg", None) or {}
        return size or _size(tuple(cfg.get("input_size", (3, 224, 224))[1:]))
    if kind == "segmentation":
        size = _size(data.get("crop_size")) or _size(getattr(task, "crop", None)) or (512, 512)
    elif kind == "detection":
        size = _size(data.get("test_scale") or getattr(task, "min_size", None) or 800)
    else:
        size = _size(getattr(task, "test_size", None) or 1024)
    return tuple(math.ceil(s / 32) * 32 for s in size)  # type: ignore[return-value]


def load_trained(
    source: str | Path,
    *,
    pretrained: str | Path | None = None,
    configs: Sequence[str | Path] = (),
    adapter_choice: str = "best",
    model_kwargs: dict[str, Any] | None = None,
) -> TrainedTask:
    """Build the task network a run directory or an adapter directory describes, its adapter loaded.

    Args:
        source: A run directory (``config.yaml`` + ``adapter-best/`` / ``adapter-last/``) or an adapter
            directory (``adapter_config.json``).
        pretrained: The pretrained weights file; replaces the config's (a run directory moved to
            another machine). Required for an adapter directory without ``configs``.
        configs: Task configs (``-c`` files) for an adapter directory; a dense backbone's adapter needs them.
        adapter_choice: ``best`` or ``last``: which of a run's adapters.
        model_kwargs: Extra ``timm.create_model`` arguments of a classifier built from an adapter
            directory alone (the adapter does not record them).

    Returns:
        The task, built and loaded, on the CPU.
    """
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"'{source}' does not exist; give a run directory (runs/<name>/) or an adapter directory")
    if adapter_choice not in ("best", "last"):
        raise ValueError(f"`adapter_choice` must be 'best' or 'last', got {adapter_choice!r}")
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"pretrained weights file '{pretrained}' does not exist")
    configs = [Path(c) for c in configs]
    for c in configs:
        if not c.is_file():
            raise FileNotFoundError(f"config file '{c}' does not exist")
    info: dict[str, Any] = {"adapter_choice": None, "configs": [str(c) for c in configs]}
    if (source / "config.yaml").is_file() and not (source / CONFIG_NAME).is_file():
        if configs:
            raise ValueError(f"'{source}' is a run directory with its own config.yaml; leave out the configs")
        adapter = source / f"adapter-{adapter_choice}"
        if not adapter.is_dir():
            raise FileNotFoundError(
                f"run directory '{source}' has no adapter-{adapter_choice}/ (did its fit finish an epoch?); "
                f"nothing trained to export"
            )
        _adapter_dir(adapter, "run adapter")
        configs = [source / "config.yaml"]
        info.update(run_dir=str(source), adapter_choice=adapter_choice, configs=[str(configs[0])])
    elif (source / CONFIG_NAME).is_file():
        adapter = source
    else:
        raise FileNotFoundError(
            f"'{source}' is neither a run directory (config.yaml, adapter-best/) nor an adapter directory ({CONFIG_NAME})"
        )
    info["adapter"] = str(adapter)
    adapter_config = json.loads((adapter / CONFIG_NAME).read_text())
    seed, data = None, {}
    if configs:
        cls = task_class(configs)  # a config that names no monatune task: said before the parse lists its fields
        config = parse_configs(configs)
        init = config.model.init_args.as_dict()
        data_config = config.get("data")
        if data_config is not None and data_config.get("init_args") is not None:
            data = data_config.init_args.as_dict() if hasattr(data_config.init_args, "as_dict") else dict(data_config.init_args)
        seed = _seed(configs)
        if model_kwargs:
            init["model_kwargs"] = {**(init.get("model_kwargs") or {}), **model_kwargs}
    else:
        if adapter_config.get("dense"):
            raise ValueError(
                f"adapter '{adapter}' is a dense backbone's (a detector's or segmenter's), whose heads the adapter does "
                "not describe; give the task config it was trained with (-c task.yaml), or export the run directory"
            )
        if pretrained is None:
            raise ValueError(f"exporting adapter '{adapter}' needs the pretrained weights file it was trained on (--pretrained)")
        from ..tasks import ImageClassifier

        cls = ImageClassifier
        init = {"backbone": adapter_config.get("backbone"), "method": adapter_config["method"],
                "method_options": adapter_config["options"], "model_kwargs": dict(model_kwargs or {})}  # fmt: skip
        if not init["backbone"]:
            raise ValueError(f"adapter '{adapter}' does not name its backbone; export it with the task config (-c)")
    kind = _kind(cls)
    if pretrained is not None:
        init["pretrained"] = str(pretrained)
    if init.get("num_classes") is None:
        init["num_classes"] = _class_count(cls, init, adapter)
    init["adapter"] = str(adapter)
    info.update(pretrained=init.get("pretrained"), num_classes=init["num_classes"], task_class=cls.__name__,
                backbone=init.get("backbone"), method=init.get("method"))  # fmt: skip
    task = cls(**init)
    if isinstance(seed, int) and not isinstance(seed, bool):
        torch.manual_seed(seed)  # the run's random draw of whatever `pretrained` does not set, as `monatune test`
    task.configure_model()
    assert get_state(task.tuned) is not None
    task.eval()
    return TrainedTask(task=task, kind=kind, image_size=_default_size(task, kind, data), source=info, data=data)
