"""The one-command simulation end to end: ``python -m deploy.simulation`` -> ``flwr run`` -> Ray.

A real Mosaic run of ``conf/quick.toml`` with 3 clients (under a minute on 2 cores, mostly
Flower and Ray start-up), and the bad configs that must fail before anything starts. A baseline
through a real launcher is tests/test_deployment.py's (FedAvg on node folders); in Ray, the
strategy is the only difference, and every strategy runs in-process in tests/test_strategy.py.
Every process a run spawns inherits its ``FLWR_HOME``, which is how the tests find leftovers.
"""

from __future__ import annotations

import json
import subprocess
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from deploy.processes import find_local_superlinks, list_processes
from tests.real_processes import fetch_fashion_mnist, processes_with_home, run_launcher

REPO = Path(__file__).resolve().parent.parent
QUICK = tomllib.loads((REPO / "conf" / "quick.toml").read_text())
RUN_TIMEOUT = 600.0  # seconds for one real run; deploy.simulation gets a bit less, to clean up
KD_KEYS = ("teacher-accuracy", "pre-kd-accuracy", "post-kd-accuracy")

pytestmark = pytest.mark.system

Simulate = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fetch_fashion_mnist(tmp_path_factory)


@pytest.fixture
def simulate(tmp_path: Path, flwr_home: Path, data_root: Path) -> Simulate:
    """Run ``python -m deploy.simulation`` with results in tmp_path; SIGTERM it on timeout."""

    def run(*args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return run_launcher(
            "deploy.simulation",
            "--flwr-home",
            str(flwr_home),
            *args,
            results=tmp_path / "results",
            data_root=data_root,
            timeout=timeout,
            margin=60,
        )

    return run


def _tail(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n"
        + (result.stderr[-6000:])
    )


def _assert_nothing_left(flwr_home: Path) -> None:
    assert not find_local_superlinks(list_processes(), flwr_home), "a SuperLink is still up"
    assert not processes_with_home(flwr_home), "processes of the run are still up"


def test_quick_mosaic_run_writes_every_result_and_stops_its_superlink(
    simulate: Simulate, tmp_path: Path, flwr_home: Path, data_root: Path
) -> None:
    result = simulate("--profile", "conf/quick.toml", "--clients", "3", "--name", "quick-mosaic")

    assert result.returncode == 0, _tail(result)
    _assert_nothing_left(flwr_home)
    folder = tmp_path / "results" / "quick-mosaic"
    config = json.loads((folder / "config.json").read_text())
    assert config["strategy"] == "mosaic"
    assert config["data-root"] == str(data_root)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics["rounds"]) == {str(r) for r in range(QUICK["num-rounds"] + 1)}
    kd_round = metrics["rounds"][str(QUICK["kd-round"])]
    assert all(0.0 <= kd_round[key] <= 1.0 for key in KD_KEYS), kd_round
    assert metrics["phase-seconds"]["total"] > 0
    label_counts = json.loads((folder / "label_counts.json").read_text())
    assert sorted(label_counts) == ["client-0", "client-1", "client-2"]
    participation = json.loads((folder / "participation.json").read_text())
    assert set(participation) == {str(r) for r in range(1, QUICK["num-rounds"] + 1)}
    assert all(len(round_log["replied"]) == 3 for round_log in participation.values())
    state = torch.load(folder / "final_model.pt", weights_only=True)
    assert state and all(isinstance(tensor, torch.Tensor) for tensor in state.values())
    assert (folder / "accuracy.png").stat().st_size > 0
    samples = sorted(p.name for p in (folder / "generator_samples").glob("client-*.png"))
    assert samples == ["client-0.png", "client-1.png", "client-2.png"]
    assert "final test accuracy" in result.stdout
    assert "post-kd-accuracy" in result.stdout


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--set", "alpha=0"], "alpha"),
        (["--set", "no-such-key=1"], "no-such-key"),
        (["--set", 'num-rounds="three"'], "num-rounds"),
        (["--clients", "1"], "min-nodes"),
    ],
)
def test_bad_config_fails_fast_naming_the_key(
    flwr_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], key: str
) -> None:
    """The launcher's own ``main``, in this process: the same checks, without paying for a
    Python start per case (the process-level exit is the next test's)."""
    from deploy.simulation import main

    places = [f"results-dir={json.dumps(str(tmp_path))}", f"data-root={json.dumps(str(tmp_path))}"]
    argv = ["--flwr-home", str(flwr_home), "--profile", str(REPO / "conf" / "quick.toml")]
    argv += ["--clients", "3", "--set", places[0], "--set", places[1], *args]

    assert main(argv) == 2
    assert key in capsys.readouterr().err
    assert not (flwr_home / "local-superlink").exists()  # flwr never ran
    _assert_nothing_left(flwr_home)


def test_a_bad_config_exits_2_before_anything_starts(simulate: Simulate, flwr_home: Path) -> None:
    started = time.monotonic()
    result = simulate("--profile", "conf/quick.toml", "--clients", "3", "--set", "alpha=0")

    assert result.returncode == 2, _tail(result)
    assert "alpha" in result.stderr
    assert time.monotonic() - started < 90  # imports only (~5 s idle); a real run takes minutes
    assert not (flwr_home / "local-superlink").exists()  # flwr never ran
    _assert_nothing_left(flwr_home)
