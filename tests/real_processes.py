"""Helpers shared by the tests that start real Flower processes (simulation and deployment)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from common.data import read_pixels
from tests.fakedata import write_idx

REPO = Path(__file__).resolve().parent.parent
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


# The real runs read the first rows of the real Fashion-MNIST: every image is real, and a run's
# data loading and server evaluation (10k test images, several models each) shrink with it.
SUBSET_TRAIN, SUBSET_TEST = 6000, 1000


def fetch_fashion_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh root holding the first ``SUBSET_TRAIN`` / ``SUBSET_TEST`` images of the real
    Fashion-MNIST, taken from the shared copy, else from the default data root."""
    command = [sys.executable, "-m", "common.fetch_data", "--dataset", "fashion-mnist"]
    if SHARED_DATASETS.is_dir():
        full = tmp_path_factory.mktemp("data")
        command += ["--from-dir", str(SHARED_DATASETS)]
    else:
        full = Path(os.environ.get("MOSAIC_DATA_ROOT") or REPO / "data")
    subprocess.run([*command, "--root", str(full)], cwd=REPO, check=True, timeout=600)
    subset = tmp_path_factory.mktemp("fashion-mnist-subset")
    raw = subset / "FashionMNIST" / "raw"
    for split, train, rows in (("train", True, SUBSET_TRAIN), ("t10k", False, SUBSET_TEST)):
        pixels, labels = read_pixels("fashion-mnist", str(full), train=train)
        write_idx(raw / f"{split}-images-idx3-ubyte", pixels[:rows, 0].numpy())
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels[:rows].numpy())
    return subset


def processes_with_home(flwr_home: Path) -> list[int]:
    """Live (not zombie) processes whose environment holds this FLWR_HOME: all a run spawned."""
    found = []
    for process in psutil.process_iter():
        try:
            if (
                process.environ().get("FLWR_HOME") == str(flwr_home)
                and process.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(process.pid)
        except psutil.Error:  # gone, or not ours to read
            continue
    return found


def run_launcher(
    module: str, *args: str, results: Path, data_root: Path, timeout: float, margin: float
) -> subprocess.CompletedProcess[str]:
    """``python -m module --timeout (timeout - margin) ... *args`` with results and data here.

    The launcher gets ``margin`` seconds less than the test waits, to stop what it started. If
    it still runs over, it is sent SIGTERM (it stops its processes, then exits) and the test
    fails with the end of its output.
    """
    command = [
        sys.executable,
        "-m",
        module,
        "--timeout",
        str(timeout - margin),
        "--set",
        f"results-dir={json.dumps(str(results))}",
        "--set",
        f"data-root={json.dumps(str(data_root))}",
        *args,
    ]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"{command} ran over {timeout} s\n{stdout[-4000:]}\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture
def flwr_home(tmp_path: Path) -> Iterator[Path]:
    """A private FLWR_HOME; whatever a test leaves running under it is stopped afterwards."""
    from deploy.processes import find_local_superlinks, list_processes, stop_processes

    home = tmp_path / "flwr-home"
    yield home
    leftovers = find_local_superlinks(list_processes(), home) + processes_with_home(home)
    if leftovers:
        stop_processes(leftovers)
