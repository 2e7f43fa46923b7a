"""Shared test setup: small, deterministic, single-threaded torch (the machine has 2 cores).

Every test is ``unit`` unless its module or itself is marked ``integration`` (whole runs of the
app in this process) or ``system`` (real Flower processes): ``pytest -m unit`` is the fast set.
"""

import os

import pytest
import torch

pytest_plugins = ["tests.real_processes"]  # the flwr_home fixture of the real-process tests
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(name) for name in ("integration", "system")):
            item.add_marker(pytest.mark.unit)
