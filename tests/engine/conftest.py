"""Fixtures of the engine tests: tiny colour data, config files and one fitted run shared by the tests."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from engine_helpers import MONA_OPTIONS, REFERENCE_ARGS, base_config, run_main, write_color_images, write_yaml


@pytest.fixture(scope="session")
def color_data(tmp_path_factory) -> Path:
    return write_color_images(tmp_path_factory.mktemp("colors") / "data")


@pytest.fixture(scope="session")
def configs(tmp_path_factory, color_data) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("configs")
    method = lambda name, options: {"model": {"init_args": {"method": name, "method_options": options}}}  # noqa: E731
    return SimpleNamespace(
        base=write_yaml(folder / "base.yaml", base_config(color_data)),
        mona=write_yaml(folder / "mona.yaml", method("mona", MONA_OPTIONS)),
        lora=write_yaml(folder / "lora.yaml", method("lora", {"rank": 4})),
    )


@pytest.fixture(scope="session")
def fitted_run(tmp_path_factory, configs) -> Path:
    """One finished 3-epoch Mona fit (the reference run), shared by the tests that only read it."""
    run_dir = tmp_path_factory.mktemp("fitted") / "run"
    assert run_main("fit", "-c", configs.base, "-c", configs.mona, "--run_dir", run_dir, *REFERENCE_ARGS) == 0
    return run_dir


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder, so that a default ``runs/`` folder would show up there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path

