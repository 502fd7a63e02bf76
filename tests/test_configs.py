"""The shipped experiment configs compose with every method config and carry the release's recipe."""
import contextlib
import io
from pathlib import Path

import pytest
import yaml

from monatune.cli import main
from monatune.methods import METHODS, resolve_method

ROOT = Path(__file__).resolve().parents[1]
TASKS = sorted((ROOT / "configs" / "cls").glob("*.yaml"))


def resolved(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def test_every_method_has_a_config():
    assert sorted(p.stem for p in (ROOT / "configs" / "methods").glob("*.yaml")) == sorted(METHODS)
    assert [p.stem for p in TASKS] == ["flowers102_swin_l", "pets_swin_l", "voc2007_multilabel_swin_l", "voc2007_swin_l"]


@pytest.mark.parametrize("task", TASKS, ids=lambda p: p.stem)
def test_task_configs_compose_with_every_method(task):
    for method in METHODS:
        config = resolved("-c", str(task), "-c", str(ROOT / "configs" / "methods" / f"{method}.yaml"))
        init = config["model"]["init_args"]
        assert init["method"] == method
        resolve_method(init["method"], init["method_options"])  # a valid method and options
        # the release's recipe (spec section 5)
        assert init["backbone"] == "swin_large_patch4_window7_224"
        assert (init["lr"], init["schedule"], init["warmup_epochs"], init["min_lr_ratio"]) == (3.125e-5, "cosine", 20, 0.01)
        assert config["trainer"]["max_epochs"] == 100 and config["trainer"]["gradient_clip_val"] == 5.0
        assert config["data"]["init_args"]["batch_size"] == 16
        assert (config["data"]["init_args"]["image_size"], config["data"]["init_args"]["resize_size"]) == (224, 256)
        mona_x2 = task.stem.startswith(("flowers102", "pets"))
        assert (init["lr_scale"] or {}).get("mona", 1.0) == (2.0 if mona_x2 else 1.0)


def test_overrides_win_over_config_files():
    task = str(ROOT / "configs" / "cls" / "pets_swin_l.yaml")
    config = resolved("-c", task, "-c", str(ROOT / "configs" / "methods" / "lora.yaml"),
                      "model.init_args.lr=0.5", "--model.init_args.method_options", "{rank: 4}")
    init = config["model"]["init_args"]
    assert (init["method"], init["lr"], init["method_options"]) == ("lora", 0.5, {"rank": 4})
    assert config["data"]["init_args"]["format"] == "pets"
