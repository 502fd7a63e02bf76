"""Command-line values: ``-o KEY=VALUE`` as people write them, and one-line errors naming the option (issue 17)."""
import json

import pytest
import torch

from monatune.cli import _parse_value, main

SWIN_T = "swin_tiny_patch4_window7_224"


def error_text(capsys, command: str) -> str:
    err = capsys.readouterr().err
    prefix = f"monatune {command}: error: "
    assert prefix in err and "Traceback" not in err, err[-2000:]
    message = err[err.index(prefix) + len(prefix) :].strip()
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("text, value", [
    ("32", 32), ("0.1", 0.1), ("1e-3", 1e-3), ("true", True), ("null", None), ("q", "q"), ("", ""),
    ("[3, 5]", [3, 5]), ("(3, 5)", [3, 5]), ("(3,)", [3]), ("3,5", [3, 5]), ("q,v", ["q", "v"]), ("[q, v]", ["q", "v"]),
])  # fmt: skip
def test_option_values_read_as_json_or_yaml_with_tuples_and_bare_lists(text, value):
    assert _parse_value(text) == value


def adapter_count(capsys, *options: str, method: str = "mona") -> int:
    assert main(["params", SWIN_T, "--method", method, *(a for o in options for a in ("-o", o)), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["adapter"]


def test_params_accepts_the_list_spellings_people_use(capsys):
    expected = adapter_count(capsys, "kernel_sizes=[3, 5]")
    assert expected < adapter_count(capsys)  # two kernels, not the default three
    for spelling in ("kernel_sizes=(3,5)", "kernel_sizes=3,5", "kernel_sizes=[3,5]"):
        assert adapter_count(capsys, spelling) == expected, spelling
    assert adapter_count(capsys, "modules=q,k", method="lora") == adapter_count(capsys, "modules=[q, k]", method="lora")


@pytest.mark.parametrize("option, expected", [
    ("kernel_sizes=4", "mona option `kernel_sizes` must be a non-empty list of positive odd ints, e.g. [3, 5, 7] "
                       "(one kernel: [3]), got 4"),
    ("kernel_sizes=(3,4)", "mona option `kernel_sizes` must be a non-empty list of positive odd ints"),
    ("bottleneck=abc", "mona option `bottleneck` must be a positive int, got 'abc'"),
    ("dropout=1", "mona option `dropout` must be a number in [0, 1), got 1"),
    ("kernel_sizes=[3,5", "-o kernel_sizes: '[3,5' is not a value JSON or YAML can read (expected ',' or ']'"),
    ("name=x", "unknown option(s) ['name'] for method 'mona'; its options are ['bottleneck', 'kernel_sizes', 'dropout', 'init']"),
    ("out_indices=[1]", "unknown option(s) ['out_indices'] for method 'mona'"),
])  # fmt: skip
def test_params_bad_option_is_one_line_naming_it(capsys, option, expected):
    assert main(["params", SWIN_T, "-o", option]) == 2
    assert error_text(capsys, "params").startswith(expected)


@pytest.mark.parametrize("kwargs, expected", [
    ("{depths: 2}", "--model-kwargs is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
                    "column 2 (char 1)): '{depths: 2}'; give a JSON object, e.g. '{\"depths\": [2, 2, 6, 2]}'"),
    ("[1]", "--model-kwargs must be a JSON object, e.g. '{\"depths\": [2, 2, 6, 2]}'; got '[1]'"),
])  # fmt: skip
def test_convert_names_model_kwargs_when_its_json_is_bad(capsys, tmp_path, kwargs, expected):
    out = tmp_path / "out"
    assert main(["convert", str(tmp_path / "release.pth"), str(out), "--model", SWIN_T, "--model-kwargs", kwargs]) == 2
    assert error_text(capsys, "convert") == expected
    assert not out.exists()


@pytest.mark.parametrize("argv, expected", [
    (["demo", "--epochs", "-1"], "monatune demo: error: argument --epochs: must be an int of at least 1, got '-1'"),
    (["demo", "--epochs", "two"], "monatune demo: error: argument --epochs: must be an int of at least 1, got 'two'"),
    (["params", "-c", "x.yaml", "--num-classes", "0"],
     "monatune params: error: argument --num-classes: must be an int of at least 1, got '0'"),
])  # fmt: skip
def test_counts_are_checked_when_parsed(capsys, argv, expected):
    with pytest.raises(SystemExit) as info:  # argparse's own error: usage, then the message
        main(argv)
    assert info.value.code == 2 and capsys.readouterr().err.strip().endswith(expected)


def test_demo_without_methods_is_refused_before_any_work(capsys, tmp_path, monkeypatch):
    import monatune.demo

    monkeypatch.setattr(monatune.demo, "run_demo", lambda *a, **k: pytest.fail("the demo ran"))
    assert main(["demo", "--methods", " ,", "--out", str(tmp_path / "demo")]) == 2
    assert error_text(capsys, "demo") == "--methods names no method, got ' ,'; give some of full,fixed,lora,adapter,mona"


def test_model_kwargs_the_architecture_does_not_take_are_one_line(tmp_path, capsys):
    from monatune.cli import main

    ckpt = tmp_path / "release.pth"
    torch.save({"state_dict": {}}, ckpt)
    code = main(["convert", str(ckpt), str(tmp_path / "out"), "--model", "swin_tiny_patch4_window7_224",
                 "--model-kwargs", '{"foo": 2}'])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "swin_tiny_patch4_window7_224 cannot be built with these arguments (got an unexpected keyword argument 'foo')" in err
    assert not (tmp_path / "out").exists()
