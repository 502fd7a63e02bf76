import os
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER") and "torch" not in sys.modules:
    # Workers share the cores, and a command a test starts (with the machine's thread count) runs alongside another
    # worker: OpenMP threads that spin while they wait then take the cores from each other. Measured with one
    # single-thread load beside a two-thread training test on 2 cores: 418 s spinning, 230 s passive (131 s alone).
    # Read by OpenMP when torch loads it, so set before torch is imported; commands the tests start inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # for release_reference and tiny_models


def pytest_configure(config):
    """Under pytest-xdist, the cores' threads are shared among the workers (torch would give each all of them)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
