"""Shared test setup: small, deterministic, single-threaded torch (the machine has 2 cores).

Every test is ``unit`` unless its module or itself is marked ``integration`` (whole runs of the
app in this process) or ``system`` (real Flower processes): ``pytest -m unit`` is the fast set.
"""

import os

import pytest
import torch

pytest_plugins = ["tests.real_processes"]  # the flwr_home fixture of the real-process tests
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# One thread per xdist worker, in this process and in every process a test starts (launchers,
# SuperLinks, ClientApps): two workers on two cores, not two OpenMP teams per ClientApp.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)


KIND_ORDER = ("system", "integration", "unit")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the unmarked tests ``unit``, and run the slowest kinds first: with ``pytest -n``
    (pytest-xdist, as ``make test`` runs it) the real-process runs start at once on every
    worker instead of queueing at the end behind hundreds of short tests."""
    for item in items:
        if not any(item.get_closest_marker(name) for name in KIND_ORDER[:2]):
            item.add_marker(pytest.mark.unit)
    items.sort(
        key=lambda item: next(i for i, k in enumerate(KIND_ORDER) if item.get_closest_marker(k))
    )
