"""Helpers of the engine tests: tiny generated data, config files, running ``monatune``.

Every test drives ``monatune.cli.main`` (in-process) or the ``monatune`` command (in a
subprocess) the way a user would: YAML files composed with ``-c`` plus overrides. The
backbone is a Swin with one block per stage at 32x32 pixels, so a 3-epoch fit takes seconds.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import timm
import torch
import yaml
from PIL import Image

import monatune
from run_cli import run_main  # noqa: F401  (the engine tests import it from here)

ENGINE_TESTS = Path(__file__).parent
BACKBONE = "swin_tiny_patch4_window7_224"
MODEL_KWARGS = {
    "embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8],
    "img_size": 32, "patch_size": 2, "window_size": 4,
}  # fmt: skip
COLORS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}  # class folders, in label order
SPLIT_SIZES = {"train": 12, "val": 5, "test": 5}  # images per class: 5 train batches of 8, 15 val images
EPOCHS, TRAIN_BATCHES = 3, 5
MONA_OPTIONS = {"bottleneck": 16}  # not the default (64), so config.yaml and results.json show the method file
# the reference fit: every step logged, a resumable checkpoint every 2 steps, drop-path drawing from the RNG
REFERENCE_ARGS = ("--trainer.log_every_n_steps", "1", "--save_every_n_steps", "2", "model.init_args.drop_path_rate=0.2")


def write_color_images(root: Path, sizes: dict[str, int] = SPLIT_SIZES, noise: float = 40.0, seed: int = 0) -> Path:
    """``root/<split>/<class>/<i>.jpg``: 40x40 solid colours with gaussian noise."""
    rng = np.random.default_rng(seed)
    for split, n in sizes.items():
        for name, color in COLORS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.asarray(color, dtype=float) + rng.normal(0.0, noise, (40, 40, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg")
    return root


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def base_config(data_root: Path, max_epochs: int = EPOCHS) -> dict:
    return {
        "trainer": {
            "max_epochs": max_epochs, "accelerator": "cpu", "devices": 1,
            "enable_model_summary": False, "enable_progress_bar": False,
        },
        "model": {
            "class_path": "monatune.tasks.ImageClassifier",
            "init_args": {"backbone": BACKBONE, "model_kwargs": MODEL_KWARGS, "lr": 0.003, "warmup_epochs": 1},
        },
        "data": {
            "class_path": "monatune.data.ClassificationData",
            "init_args": {
                "root": str(data_root), "batch_size": 8, "num_workers": 0, "image_size": 32, "resize_size": 36,
            },
        },
    }  # fmt: skip


def subprocess_env() -> dict[str, str]:
    """This environment with tests/engine importable (for ``probes``) and one torch thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ENGINE_TESTS), *filter(None, [env.get("PYTHONPATH")])])
    return env


def monatune_command() -> list[str]:
    """The ``monatune`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("monatune")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "monatune.cli"]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """``relative path -> (sha256, mtime_ns)`` of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def build_tuned(drop_path_rate: float = 0.0, **options: object) -> torch.nn.Module:
    """The network a fit with the Mona method file builds, made by hand from the same seed (0)."""
    torch.manual_seed(0)  # what seed_everything(0) does for torch; the frozen backbone is this random draw
    model = timm.create_model(
        BACKBONE, pretrained=False, num_classes=len(COLORS), drop_path_rate=drop_path_rate, **MODEL_KWARGS
    )
    monatune.apply(model, "mona", **(options or MONA_OPTIONS))
    return model
