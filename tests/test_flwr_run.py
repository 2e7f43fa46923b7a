"""The README's ``flwr run .`` line, run as a user would right after ``make setup``.

Flower's own CLI, not the launcher: no run config but the profile, so the app must find the
data where setup put it (``<checkout>/data``) and write its results under ``<checkout>/results``
(common/paths.py). The test reads the command from README.md, so the two cannot drift apart.
Its environment is a user's after ``source .venv/bin/activate`` and the README's ``export``,
plus a private FLWR_HOME and free ports so that it never meets another SuperLink; every process
the run leaves (Flower keeps its local SuperLink up) is stopped by PID afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.paths import default_data_root, default_results_dir, installed_checkout
from deploy.processes import free_ports

REPO = Path(__file__).resolve().parent.parent
README_COMMAND = re.compile(r"^flwr run \. .*conf/quick\.toml.*$", re.MULTILINE)
README_EXPORT = re.compile(r"^export (FLWR_[A-Z_]+)=(\S+)", re.MULTILINE)
RUN_TIMEOUT = 600.0

pytestmark = pytest.mark.system


def test_the_environment_was_installed_from_this_checkout() -> None:
    assert installed_checkout() == REPO
    assert default_data_root() == REPO / "data"
    assert default_results_dir() == REPO / "results"


def test_readme_flwr_run_line_works_after_setup(flwr_home: Path) -> None:
    readme = (REPO / "README.md").read_text()
    match = README_COMMAND.search(readme)
    assert match, "README.md shows no `flwr run . ... conf/quick.toml` line"
    command = shlex.split(match.group(0))
    if not (REPO / "data" / "FashionMNIST").is_dir():
        pytest.skip("no data in <checkout>/data: run `make setup` first")

    venv_bin = Path(sys.executable).parent
    http_port, control_port = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOSAIC_")}
    env.update(dict(README_EXPORT.findall(readme)))  # what the README tells users to export
    env.update(
        PATH=os.pathsep.join([str(venv_bin), env.get("PATH", "")]),  # source .venv/bin/activate
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
    )
    assert env.get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION") == "1", (
        "the README must export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1, or Flower "
        "uv-syncs the app's dependencies (a multi-GB torch) into a fresh env for every run"
    )
    results = REPO / "results"
    before = set(results.iterdir()) if results.is_dir() else set()
    try:
        finished = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
        )
        new = sorted(set(results.iterdir()) - before) if results.is_dir() else []
        output = finished.stdout[-6000:] + finished.stderr[-3000:]
        assert finished.returncode == 0, output
        assert len(new) == 1, f"expected one new results folder, got {new}\n{output}"
        folder = new[0]
        config = json.loads((folder / "config.json").read_text())
        assert config["data-root"] == "" and config["results-dir"] == ""  # the defaults did it
        metrics = json.loads((folder / "metrics.json").read_text())
        assert sorted(metrics["rounds"], key=int) == ["0", "1", "2", "3"], output
        assert 0.0 <= metrics["rounds"]["3"]["accuracy"] <= 1.0
        state = torch.load(folder / "final_model.pt", weights_only=True)
        assert state and all(isinstance(t, torch.Tensor) for t in state.values())
    finally:
        for folder in set(results.iterdir()) - before if results.is_dir() else ():
            shutil.rmtree(folder)
