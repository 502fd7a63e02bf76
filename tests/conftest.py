import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # for release_reference and tiny_models


def pytest_configure(config):
    """Under pytest-xdist, the cores' threads are shared among the workers (torch would give each all of them)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
