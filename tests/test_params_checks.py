"""count_config_parameters checks what it is given before it parses or builds anything (issue 17)."""
import pytest

from monatune.cli import main
from monatune.params import count_config_parameters

SWIN_T = "swin_tiny_patch4_window7_224"


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "cls.yaml"
    path.write_text(f"model:\n  class_path: monatune.tasks.ImageClassifier\n  init_args:\n    backbone: {SWIN_T}\n"
                    "    num_classes: 3\ndata:\n  class_path: monatune.data.ClassificationData\n  init_args:\n"
                    f"    root: {tmp_path / 'no_data'}\n")  # fmt: skip
    return path


def test_one_config_path_is_one_file_not_a_sequence_of_letters(config):
    one = count_config_parameters(str(config))
    assert one.total == count_config_parameters([config]).total and one.num_classes == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_classes="3"), "`num_classes` must be a positive int, got '3'"),
    (dict(num_classes=True), "`num_classes` must be a positive int, got True"),
    (dict(num_classes=0), "`num_classes` must be a positive int, got 0"),
    (dict(init_args=[("method", "lora")]), "`init_args` must be a mapping of model.init_args names to values, got [('method', 'lora')]"),
    (dict(init_args={"method_options": [8]}), "`method_options` must be a mapping of option names to values, got [8]"),
    (dict(init_args={"bakbone": SWIN_T}), "unknown init_args ['bakbone'] for ImageClassifier; it takes ['backbone', 'num_classes'"),
    (dict(init_args={"method_options": {"kernel_sizes": 4}}), "mona option `kernel_sizes` must be a non-empty list"),
])  # fmt: skip
def test_bad_arguments_are_value_errors_naming_them(config, kwargs, message):
    with pytest.raises(ValueError) as info:
        count_config_parameters([config], **kwargs)
    assert str(info.value).startswith(message), str(info.value)


def test_no_method_options_means_the_configs(config):
    assert count_config_parameters([config], init_args={"method_options": None}).adapter == count_config_parameters([config]).adapter


def test_params_command_with_configs_checks_the_options(config, capsys):
    assert main(["params", "-c", str(config), "-o", "kernel_sizes=4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "monatune params: error: mona option `kernel_sizes` must be" in err and "got 4" in err
    assert main(["params", "-c", str(config), "-o", "kernel_sizes=(3,5)", "--json"]) == 0
