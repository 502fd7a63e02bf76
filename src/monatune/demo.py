"""``monatune demo``: what Mona-tuning is for, on a laptop CPU, with nothing downloaded.

1. Pretrain a small Swin from scratch on a generated task: eight kinds of shapes (circles,
   squares, triangles, crosses, ...) drawn at random places, sizes and strokes. The weights
   are cached, so this happens once per machine.
2. Transfer it to a different, real, labelled data set that ships with monatune: the UCI
   handwritten digits (1,797 scans of 8×8 pixels; CC BY 4.0, see ``monatune/assets/NOTICE``),
   with ``full``, ``fixed``, ``lora``, ``adapter`` and ``mona``, each with the same recipe.
3. Print a table (method, trainable %, test accuracy, time) and write it with a plot.

Every image goes through the same code as a real run: PNG files in an image folder,
:class:`~monatune.data.ClassificationData`, :class:`~monatune.tasks.ImageClassifier`
loading the pretrained file with :func:`monatune.load_pretrained`, a Lightning Trainer.
Whatever the ranking is at this scale, it is printed as measured.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .atomic import recover_directory, replace_directory, staging_directory

__all__ = ["run_demo", "DEMO_BACKBONE", "DEMO_METHODS", "write_shapes", "write_digits", "cache_dir"]

DEMO_BACKBONE = {
    "backbone": "swin_tiny_patch4_window7_224",
    "model_kwargs": {
        "img_size": 32, "patch_size": 4, "window_size": 4, "embed_dim": 48, "depths": [2, 2, 2], "num_heads": [2, 4, 8],
    },
}
# bottlenecks and ranks scaled to the 48-192 channels of the demo model (the defaults suit 128-1536)
DEMO_METHODS: dict[str, dict[str, Any]] = {
    "full": {},
    "fixed": {},
    "lora": {"rank": 4},
    "adapter": {"bottleneck": 8},
    "mona": {"bottleneck": 8},
}
SHAPES = ("circle", "disk", "square", "box", "triangle", "plus", "cross", "stripes")
_DATA = dict(image_size=32, resize_size=32, crop_scale=(0.7, 1.0), hflip=False, mean=(0.5,) * 3, std=(0.5,) * 3)


def cache_dir() -> Path:
    """``$MONATUNE_CACHE``, else ``$XDG_CACHE_HOME/monatune``, else ``~/.cache/monatune``."""
    if os.environ.get("MONATUNE_CACHE"):
        return Path(os.environ["MONATUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "monatune"


def _shape(kind: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    image = Image.new("L", (size, size), int(rng.integers(0, 60)))
    draw = ImageDraw.Draw(image)
    r = rng.uniform(6, 12)
    cx, cy = rng.uniform(r + 1, size - r - 1, 2)
    ink, width = int(rng.integers(170, 256)), int(rng.integers(1, 4))
    angle = rng.uniform(0, 2 * math.pi)

    def polygon(n: int, start: float) -> list[tuple[float, float]]:
        return [(cx + r * math.cos(start + 2 * math.pi * i / n), cy + r * math.sin(start + 2 * math.pi * i / n)) for i in range(n)]

    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == "circle":
        draw.ellipse(box, outline=ink, width=width)
    elif kind == "disk":
        draw.ellipse(box, fill=ink)
    elif kind == "square":
        draw.polygon(polygon(4, angle), outline=ink, width=width)
    elif kind == "box":
        draw.polygon(polygon(4, angle), fill=ink)
    elif kind == "triangle":
        draw.polygon(polygon(3, angle), outline=ink, width=width)
    elif kind in ("plus", "cross"):
        a = rng.uniform(-0.3, 0.3) + (math.pi / 4 if kind == "cross" else 0.0)
        for t in (a, a + math.pi / 2):
            dx, dy = r * math.cos(t), r * math.sin(t)
            draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=ink, width=width + 1)
    else:  # stripes: three parallel bars
        dx, dy = r * math.cos(angle), r * math.sin(angle)
        for k in (-1, 0, 1):
            ox, oy = -dy * 0.45 * k, dx * 0.45 * k
            draw.line([cx - dx + ox, cy - dy + oy, cx + dx + ox, cy + dy + oy], fill=ink, width=width)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (size, size))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_folder(root: Path, fill: Callable[[Path], None]) -> Path:
    """Write a data folder beside ``root`` and move it in complete: a killed write never leaves a partial one."""
    staged = staging_directory(root)
    try:
        fill(staged)
        replace_directory(staged, root)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return root


def write_shapes(root: Path, per_class: int = 500, seed: int = 0) -> Path:
    """An image folder of the generated shapes task: ``root/{train,val}/<shape>/*.png``, written in one step."""

    def fill(staged: Path) -> None:
        rng = np.random.default_rng(seed)
        for split, n in (("train", per_class), ("val", max(per_class // 10, 2))):
            for kind in SHAPES:
                folder = staged / split / kind
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    _shape(kind, rng).save(folder / f"{i:05d}.png")

    return _write_folder(Path(root), fill)


DIGITS_COUNT = 1797  # images in assets/digits.csv.gz


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The UCI handwritten digits shipped with monatune: images (1797, 8, 8) in 0..16 and labels."""
    path = Path(__file__).parent / "assets" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return table[:, :64].reshape(-1, 8, 8), table[:, 64]


def write_digits(root: Path, seed: int = 0, fractions: tuple[float, float] = (0.6, 0.2)) -> Path:
    """An image folder of the digits, upscaled to 32×32 and split train/val/test by ``fractions``."""
    images, labels = read_digits()
    order = np.random.default_rng(seed).permutation(len(labels))
    n_train, n_val = int(fractions[0] * len(order)), int(fractions[1] * len(order))
    splits = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}

    def fill(staged: Path) -> None:
        for split, indices in splits.items():
            for i in indices:
                folder = staged / split / str(labels[i])
                folder.mkdir(parents=True, exist_ok=True)
                pixels = (images[i] * (255 / 16)).astype(np.uint8)
                Image.fromarray(pixels).resize((32, 32), Image.BILINEAR).save(folder / f"{i:04d}.png")

    return _write_folder(Path(root), fill)


def prepare_digits(root: Path, seed: int = 0) -> Path:
    """The digits folder at ``root``: reused when complete, else written (in one step)."""
    recover_directory(root)
    # a folder missing images (one a killed older version left) is written again
    if not root.is_dir() or sum(1 for _ in root.rglob("*.png")) != DIGITS_COUNT:
        write_digits(root, seed=seed)
    return root


def _fit(
    method: str,
    options: dict[str, Any],
    data_root: Path,
    out: Path,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    pretrained: Path | None,
    seed: int,
    progress: bool,
) -> tuple[Any, Any, Any, Any, float]:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from .data import ClassificationData
    from .engine import AdapterCheckpoint, RunSummary
    from .tasks import ImageClassifier

    L.seed_everything(seed, verbose=False)
    data = ClassificationData(str(data_root), format="imagefolder", batch_size=batch_size, num_workers=0, seed=seed, **_DATA)
    model = ImageClassifier(
        DEMO_BACKBONE["backbone"], model_kwargs=DEMO_BACKBONE["model_kwargs"], method=method, method_options=options,
        pretrained=str(pretrained) if pretrained else None, lr=lr, weight_decay=0.05, warmup_epochs=0.5,
    )
    adapters = AdapterCheckpoint()
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=str(out), logger=CSVLogger(out, name="", version=""),
        callbacks=[RunSummary(), adapters], enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=progress, log_every_n_steps=5, num_sanity_val_steps=0, use_distributed_sampler=False,
        gradient_clip_val=5.0,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    return model, data, trainer, adapters, time.perf_counter() - start


def pretrain(cache: Path, *, per_class: int, epochs: int, seed: int = 0, progress: bool = True,
             log: Callable[[str], None] = print) -> Path:
    """The demo's pretrained Swin, trained on the shapes task once and cached by its settings."""
    from safetensors.torch import save_file

    key = json.dumps({"arch": DEMO_BACKBONE, "per_class": per_class, "epochs": epochs, "seed": seed, "v": 1}, sort_keys=True)
    folder = cache / f"demo-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    weights = folder / "swin_shapes.safetensors"
    if weights.is_file():
        log(f"pretrained Swin: cached at {weights}")
        return weights
    log(f"pretraining a small Swin on {len(SHAPES)} generated shapes (once; cached in {folder})")
    shapes = write_shapes(folder / "shapes", per_class=per_class, seed=seed)
    model, _, trainer, _, seconds = _fit(
        "full", {}, shapes, folder / "pretrain", epochs=epochs, lr=2e-3, batch_size=32, pretrained=None, seed=seed,
        progress=progress,
    )
    log(f"  shapes accuracy {float(trainer.callback_metrics['val/acc']):.3f} after {seconds:.0f} s")
    state = {k: v.detach().contiguous() for k, v in model.model.state_dict().items()}
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, weights)
    return weights


def run_demo(
    out: str | Path = "runs/demo",
    *,
    methods: Sequence[str] = tuple(DEMO_METHODS),
    epochs: int = 6,
    pretrain_epochs: int = 10,
    shapes_per_class: int = 500,
    lr: float = 2e-3,
    cache: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Pretrain (or reuse) the small Swin, transfer it to the digits with each method, report.

    Returns one row per method: method, trainable parameters and %, test accuracy, fit seconds.
    Writes ``demo.json``, ``demo.md`` and ``demo.png`` into ``out``, and each method's run
    directory (metrics, adapters, results.json) under ``out/<method>``.
    """
    import logging

    import lightning  # noqa: F401  (it sets its loggers' levels on import)

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")  # Lightning's own
    for name in ("lightning.pytorch", "lightning.fabric"):  # no device banners between the demo's lines
        logging.getLogger(name).setLevel(logging.WARNING)
    unknown = [m for m in methods if m not in DEMO_METHODS]
    if unknown:
        raise ValueError(f"the demo runs {list(DEMO_METHODS)}; unknown: {unknown}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache is not None else cache_dir()
    weights = pretrain(cache, per_class=shapes_per_class, epochs=pretrain_epochs, seed=seed, progress=progress, log=log)
    digits = prepare_digits(out / "digits", seed=seed)
    rows = []
    for method in methods:
        log(f"transferring to the digits with {method} ...")
        model, data, trainer, adapters, seconds = _fit(
            method, DEMO_METHODS[method], digits, out / method, epochs=epochs, lr=lr, batch_size=32,
            pretrained=weights, seed=seed, progress=progress,
        )
        test = trainer.test(model, data, verbose=False)[0]
        report = model.param_report()
        rows.append({
            "method": method,
            "options": DEMO_METHODS[method],
            "trainable": report.trainable,
            "total": report.total,
            "trainable_percent": round(report.trainable_percent, 3),
            "test_accuracy": round(test["test/acc"], 4),
            "best_val_accuracy": round(float(adapters.best), 4),
            "fit_seconds": round(seconds, 1),
        })
    table = format_table(rows)
    log(table)
    (out / "demo.md").write_text(table + "\n")
    (out / "demo.json").write_text(json.dumps({"rows": rows, "epochs": epochs, "lr": lr, "seed": seed}, indent=2) + "\n")
    plot(rows, out / "demo.png")
    log(f"wrote {out / 'demo.md'}, {out / 'demo.json'} and {out / 'demo.png'}")
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| method | trainable params | trainable % | test accuracy | fit time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['trainable_percent']:.2f} | {r['test_accuracy']:.4f} | {r['fit_seconds']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        x = max(r["trainable_percent"], 1e-3)
        ax.scatter(x, r["test_accuracy"], s=40)
        ax.annotate(r["method"], (x, r["test_accuracy"]), textcoords="offset points", xytext=(5, 4))
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters (% of the model, log scale)", ylabel="test accuracy (digits)",
           title="small Swin pretrained on shapes, transferred to digits")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
