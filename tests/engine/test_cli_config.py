"""Config files compose in order, overrides win, and per-method learning-rate scales apply."""
import pytest
import yaml
from engine_helpers import BACKBONE, MODEL_KWARGS, base_config, run_main

from monatune.tasks import ImageClassifier


def test_print_config_composes_files_and_key_value_overrides(configs, color_data, in_tmp, capsys):
    with pytest.raises(SystemExit) as stop:  # prints the resolved config and stops before building anything
        run_main("fit", "-c", configs.base, "-c", configs.lora, "model.init_args.lr=0.5", "--print_config")
    assert stop.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    init = config["model"]["init_args"]
    assert (init["method"], init["method_options"], init["lr"]) == ("lora", {"rank": 4}, 0.5)
    assert (init["backbone"], init["model_kwargs"], init["warmup_epochs"]) == (BACKBONE, MODEL_KWARGS, 1)  # base file
    data = base_config(color_data)["data"]
    assert config["data"]["class_path"] == data["class_path"]
    assert {k: config["data"]["init_args"][k] for k in data["init_args"]} == data["init_args"]
    assert config["trainer"]["max_epochs"] == 3
    assert list(in_tmp.iterdir()) == []  # no run directory


@pytest.mark.parametrize("method, lr", [("mona", 2e-4), ("lora", 1e-4)])
def test_lr_scale_multiplies_its_method_only(method, lr):
    model = ImageClassifier(BACKBONE, method=method, lr=1e-4, lr_scale={"mona": 2.0})
    assert model.lr == lr
    assert model.hparams["lr"] == 1e-4  # the config keeps the base value, so a re-run does not scale twice
