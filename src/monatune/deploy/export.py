"""``monatune export``: a trained run (or adapter) as ``model.pt2`` and ``model.onnx``, checked, with ``export.json``.

What is exported per task (the network after :func:`~monatune.deploy.fold`):

- classification: the classifier, ``image`` (B, 3, H, W) -> ``logits`` (B, classes);
- semantic segmentation: the UperNet network, ``image`` -> ``logits`` (B, classes, H, W) at the input's
  size (the decode head's 1/4-resolution logits resized, as the task's ``forward``); no auxiliary head;
- detection and oriented detection: the whole detector cannot be captured (see :data:`DETECTOR_REFUSAL`);
  with ``features=True`` its backbone and FPN are: the normalised, padded batch the detector's backbone
  receives -> the FPN's maps, one output per level, for the heads and NMS to run in PyTorch.

The batch is dynamic; so are height and width where the backbone captures with symbolic sizes in
reasonable time (timm ViT/EVA with ``dynamic_img_size``, convolutional classifiers, dense ViT/EVA). Other
backbones (Swin and the windowed families) export at one size, and ``export.json`` says why.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from ..atomic import recover_directory, replace_directory, staging_directory
from .check import check_outputs, machine, onnx_session, time_forms
from .fold import FoldedMona, fold
from .load import TrainedTask, load_trained

__all__ = ["export_model", "ExportCheckError", "DETECTOR_REFUSAL", "EXPORT_FILE"]

EXPORT_FILE = "export.json"
_FILES = ("model.pt2", "model.onnx", "model.onnx.data", EXPORT_FILE)
FORMAT, FORMAT_VERSION = "monatune-export", 1
DETECTOR_REFUSAL = (
    "a whole {what} cannot be exported: after its heads it keeps a data-dependent number of boxes (a score "
    "threshold, then NMS: torchvision's batched_nms picks its algorithm by the number of boxes, monatune's rotated "
    "box operations check theirs), where torch.export stops with 'Could not guard on data-dependent expression'; "
    "and it resizes and batches a list of images in Python. Export its backbone and FPN, the maps every head reads "
    "and most of the compute, with --features (features=True), and run the heads and NMS in PyTorch"
)


class ExportCheckError(RuntimeError):
    """The exported files were written but do not give eager PyTorch's outputs within the tolerance."""


class _Logits(nn.Module):
    """A segmentation network's ``"out"`` logits as one tensor."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: Tensor) -> Tensor:
        return self.network(image)["out"]


class _Features(nn.Module):
    """A detector's backbone and FPN: the normalised, padded batch -> the FPN's maps, finest first."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.backbone(image).values())


def _wrap(trained: TrainedTask, network: nn.Module) -> nn.Module:
    """The module that is exported: the network, or the part of it with one tensor in and tensors out."""
    if trained.kind == "classification":
        return network
    if trained.kind == "segmentation":
        return _Logits(network)
    return _Features(network.backbone)


def _dynamic_size(trained: TrainedTask) -> tuple[bool, str | None]:
    """Whether height and width can be symbolic, and if not, why."""
    from ..models.vit import DenseEva, DenseViT

    tuned = trained.task.tuned
    if trained.kind == "classification":
        if getattr(tuned, "dynamic_img_size", False) or getattr(tuned, "patch_embed", None) is None:
            return True, None
        return False, (f"{type(tuned).__name__} takes images of one size (its patch embedding is built for "
                       f"{tuple(tuned.patch_embed.img_size)}; timm's dynamic_img_size=True in model_kwargs lifts that "
                       "for ViT/EVA)")  # fmt: skip
    if isinstance(tuned, (DenseViT, DenseEva)):
        return True, None
    return False, (f"{type(tuned).__name__}'s padded-window attention does not capture with symbolic image sizes in "
                   "reasonable time yet (issue 21, item 2); exported at one size")  # fmt: skip


def _unpad_dense_vit(trained: TrainedTask, folded: nn.Module) -> None:
    """A dense ViT/EVA pads its input to the patch size itself (``DenseMixin._pad_to_patch``), so timm's own
    ``dynamic_img_pad`` has nothing left to pad; turned off in the folded copy, its ``math.ceil`` of the image
    size leaves the graph (``torch.export.save`` cannot serialise that symbolic operation). Exact: the sizes
    it sees are multiples of the patch size, where ceil and floor agree."""
    from ..models.vit import DenseEva, DenseViT

    if isinstance(trained.task.tuned, (DenseViT, DenseEva)):
        for module in folded.modules():
            if isinstance(module, (DenseViT, DenseEva)):
                module.patch_embed.dynamic_img_pad = False


def _export(folded: nn.Module, sample: Tensor, dynamic_size: bool, staged: Path) -> Any:
    """``torch.export`` of ``folded`` (dynamic batch, and height and width when asked), saved as model.pt2."""
    dims = {0: torch.export.Dim.DYNAMIC}
    if dynamic_size:
        dims.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    program = torch.export.export(folded, (sample,), dynamic_shapes=(dims,))
    torch.export.save(program, staged / "model.pt2")
    return program


def _preprocess(trained: TrainedTask) -> dict[str, Any]:
    """What the exported input expects, for the one who feeds it."""
    if trained.kind in ("classification", "segmentation"):
        cfg = getattr(trained.task.tuned, "pretrained_cfg", None) or {}
        mean = trained.data.get("mean") or cfg.get("mean") or IMAGENET_DEFAULT_MEAN
        std = trained.data.get("std") or cfg.get("std") or IMAGENET_DEFAULT_STD
        return {"what": "RGB in 0..1, (x - mean) / std, as the task's data module feeds the network", "mean": list(mean),
                "std": list(std), "from": "the data config" if trained.data.get("mean") else "the backbone's timm config"}  # fmt: skip
    transform = getattr(trained.network, "transform", None)
    if transform is not None:  # torchvision detectors
        return {"what": "the detector's normalised, padded batch: RGB in 0..1, (x - mean) / std, resized as the "
                        "detector's transform does, padded right and bottom with zeros to a multiple of 32",
                "mean": list(transform.image_mean), "std": list(transform.image_std), "size_divisor": 32,
                "min_size": transform.min_size, "max_size": transform.max_size}  # fmt: skip
    from ..models.oriented.views import MEAN, STD

    return {"what": "the detector's normalised, padded batch: RGB in 0..255, (x - mean) / std, padded right and "
                    "bottom with zeros to a multiple of 32", "mean": list(MEAN), "std": list(STD), "size_divisor": 32}  # fmt: skip


def _check_destination(out: Path) -> None:
    recover_directory(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"'{out}' exists and is not a directory; give a new or empty folder for the export")
    if out.is_dir() and not (out / EXPORT_FILE).is_file():
        others = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if others:
            raise ValueError(f"'{out}' holds other files ({', '.join(others[:3])}) and no earlier export; "
                             "export to a new or empty folder")  # fmt: skip


def _readable(folder: Path) -> None:
    """Give the staged folder the permissions a new folder gets (mkdtemp makes it private to its owner)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


def _file_info(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _shape_names(t: Tensor, dims: dict[int, str]) -> list[Any]:
    return [dims.get(i, int(s)) for i, s in enumerate(t.shape)]


def export_model(
    source: str | Path,
    out: str | Path,
    *,
    pretrained: str | Path | None = None,
    configs: Sequence[str | Path] = (),
    adapter_choice: str = "best",
    model_kwargs: dict[str, Any] | None = None,
    image_size: int | tuple[int, int] | None = None,
    features: bool = False,
    dynamic_size: bool | None = None,
    batch_size: int = 2,
    tolerance: float = 1e-4,
    warmup: int = 2,
    runs: int = 5,
) -> dict[str, Any]:
    """Export a trained run (or an adapter and its pretrained file) as ``model.pt2`` and ``model.onnx``.

    The network is folded (:func:`~monatune.deploy.fold`), captured once by ``torch.export`` (saved as
    ``model.pt2``) and that program translated by the dynamo ONNX exporter (``model.onnx``; weights over
    2 GB go to ``model.onnx.data``). Both are then checked against the eager network on random inputs, at
    the export size and at a second size (a second batch size when the image size is fixed), and timed side
    by side with eager PyTorch; ``export.json`` records it all. The folder is written beside ``out`` and put
    in place in one step; a failed check still puts it there (the files are kept for a look) and raises.

    Args:
        source: A run directory or an adapter directory (:func:`monatune.deploy.load.load_trained`).
        out: The folder to write (new, empty, or an earlier export).
        pretrained: The pretrained weights file (required for an adapter directory without ``configs``).
        configs: Task configs for an adapter directory (required for a detector's or segmenter's adapter).
        adapter_choice: ``best`` or ``last`` adapter of a run.
        model_kwargs: Extra ``timm.create_model`` arguments of a classifier built from an adapter alone.
        image_size: The export size (an int or (H, W)); default: the task's evaluation size by its config.
        features: For a detector: export its backbone and FPN (the whole detector cannot be exported).
        dynamic_size: Symbolic height and width: None decides by the backbone, True insists, False fixes them.
        batch_size: Batch of the export sample and of the timings (2 or more: torch.export takes a batch of
            1 for a constant).
        tolerance: Largest relative error the check passes.
        warmup: Untimed runs of each form before the timings.
        runs: Timed runs of each form; the median is reported.

    Returns:
        What ``export.json`` holds.

    Raises:
        ExportCheckError: The files were written but failed the check (the numbers are in the message).

    Example:
        >>> info = export_model("runs/flowers102_swin_l-mona", "exports/flowers")
        >>> info["check"]["max_relative_error"], info["timing"]["ratio_to_eager"]
    """
    out = Path(out)
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"`batch_size` must be an int of at least 2 (a batch of 1 exports as a constant), got {batch_size!r}")
    if runs < 1 or warmup < 0:
        raise ValueError(f"`runs` must be at least 1 and `warmup` at least 0, got {runs} and {warmup}")
    _check_destination(out)
    trained = load_trained(source, pretrained=pretrained, configs=configs, adapter_choice=adapter_choice,
                           model_kwargs=model_kwargs)  # fmt: skip
    if trained.kind in ("detection", "oriented detection") and not features:
        what = getattr(trained.task, "detector", trained.kind)
        raise ValueError(DETECTOR_REFUSAL.format(what=f"{what} detector"))
    if features and trained.kind not in ("detection", "oriented detection"):
        raise ValueError(f"features=True (--features) is for detectors; a {trained.kind} network is exported whole")
    allowed, reason = _dynamic_size(trained)
    if dynamic_size is False:
        allowed, reason = False, "fixed by the caller (dynamic_size=False)"
    elif dynamic_size is True:
        allowed, reason = True, None
    size = trained.image_size if image_size is None else (
        (image_size, image_size) if isinstance(image_size, int) else tuple(image_size))  # fmt: skip
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"`image_size` must be a positive int or (height, width), got {image_size!r}")
    embed = getattr(trained.task.tuned, "patch_embed", None)
    if trained.kind == "classification" and getattr(embed, "strict_img_size", False) and tuple(embed.img_size) != size:
        raise ValueError(f"{trained.source['backbone']} was built for {tuple(embed.img_size)} images, not {size}; export "
                         "at its size, or build it for yours (model_kwargs img_size, in the config or --model-kwargs)")
    eager = _wrap(trained, trained.network).eval()
    folded = _wrap(trained, fold(trained.network, inplace=False)).eval()
    _unpad_dense_vit(trained, folded)
    num_folded = sum(isinstance(m, FoldedMona) for m in folded.modules())
    sample = torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = eager(sample)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    input_name = "image"
    output_names = ["logits"] if len(outputs) == 1 and not features else [f"level_{i}" for i in range(len(outputs))]

    staged = staging_directory(out)
    try:
        _readable(staged)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                program = _export(folded, sample, allowed, staged)
            except Exception as e:  # noqa: BLE001  (torch.export raises many kinds; a fixed size may still capture)
                if not allowed or dynamic_size is True:
                    raise
                allowed, reason = False, f"torch.export failed with symbolic sizes ({type(e).__name__}: " \
                                         f"{str(e).splitlines()[0][:300]}); exported at one size"
                program = _export(folded, sample, False, staged)
            large = sum(p.numel() * p.element_size() for p in folded.parameters()) > 1.8e9  # protobuf's 2 GB
            with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its steps
                torch.onnx.export(program, (sample,), str(staged / "model.onnx"), dynamo=True, external_data=large,
                                  input_names=[input_name], output_names=output_names, verbose=False)  # fmt: skip
        loaded = torch.export.load(staged / "model.pt2").module()
        session = onnx_session(staged / "model.onnx", torch.get_num_threads())
        h, w = size
        second = (1, 3, h + 32, w + 64) if allowed else (1, 3, h, w)
        check = check_outputs(eager, loaded, session, [tuple(sample.shape), second], tolerance)
        feed = {session.get_inputs()[0].name: sample.numpy()}
        with torch.no_grad():
            timing = time_forms({
                "eager": lambda: eager(sample), "eager_folded": lambda: folded(sample),
                "pt2": lambda: loaded(sample), "onnxruntime": lambda: session.run(None, feed),
            }, warmup=warmup, runs=runs)  # fmt: skip
        timing["batch_size"], timing["input_shape"] = batch_size, list(sample.shape)
        batch_dim = {0: "batch", **({2: "height", 3: "width"} if allowed else {})}
        info = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "task": trained.kind, **{k: v for k, v in trained.source.items()},
            "exported": {"classification": "the classifier: logits (B, classes)",
                         "segmentation": "UperNet: logits (B, classes, H, W) at the input's size (no auxiliary head)",
                         }.get(trained.kind, "the detector's backbone and FPN: one map per FPN level, finest first"),  # fmt: skip
            "input": {"name": input_name, "shape": _shape_names(sample, batch_dim), "dtype": "float32",
                      "layout": "NCHW", "preprocess": _preprocess(trained)},  # fmt: skip
            "outputs": [{"name": n, "shape": _shape_names(o, {0: "batch", **({2: "dynamic", 3: "dynamic"} if allowed else {})})}
                        for n, o in zip(output_names, outputs)],  # fmt: skip
            "export_size": list(size),
            "dynamic": {"batch": True, "image_size": allowed, "why_not": reason},
            "folded": {"mona_modules": num_folded,
                       "note": "merging methods merged into the weights, Mona folded; other adapters as trained"},
            "files": {p.name: _file_info(p) for p in sorted(staged.iterdir()) if p.is_file()},
            "check": check,
            "timing": timing,
            "machine": machine(),
        }  # fmt: skip
        (staged / EXPORT_FILE).write_text(json.dumps(info, indent=2, allow_nan=True) + "\n")
        replace_directory(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if not check["passed"]:
        worst = "; ".join(f"{tuple(c['input_shape'])}: pt2 {c['pt2_max_relative_error']:.3g}, onnx "
                          f"{c['onnx_max_relative_error']:.3g}" + "".join(f" ({c[k]})" for k in ("pt2_error", "onnx_error") if k in c)
                          for c in check["cases"])  # fmt: skip
        raise ExportCheckError(
            f"the exported files in '{out}' FAILED the check: relative errors against eager PyTorch {worst} "
            f"(tolerance {tolerance:g}); they are kept there with export.json for a look, but do not deploy them"
        )
    return info
