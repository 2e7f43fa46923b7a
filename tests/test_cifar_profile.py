"""The paper's setting as a profile: CIFAR-10 from user-supplied files, a CIFAR ResNet-18 and
augmented local training, run end to end on tiny files at tiny sizes."""

import json
import tomllib
from pathlib import Path

import pytest

from common.config import pyproject_defaults
from server_app.inprocess import run_inprocess
from server_app.results import RunResults
from tests.fakedata import write_fake_cifar10

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "conf" / "cifar10-resnet18.toml"
# The profile's sizes shrunk to seconds on a CPU; everything it sets otherwise stays.
TINY = {
    "num-rounds": 2,
    "kd-round": 2,
    "proto-start-round": 1,
    "proto-bank-rounds": 2,
    "min-nodes": 3,
    "partitioning": "iid",
    "local-epochs": 0.0,
    "local-steps": 2,
    "batch-size": 8,
    "gen-steps": 2,
    "gen-batch-size": 4,
    "kd-steps": 2,
    "kd-batch-per-generator": 4,
    "meta-epochs": 1,
    "device": "cpu",
}


@pytest.mark.integration
def test_the_cifar_profile_runs_on_user_supplied_cifar10_files(tmp_path, monkeypatch) -> None:
    root = write_fake_cifar10(tmp_path / "data", monkeypatch, per_batch=12)
    profile = tomllib.loads(PROFILE.read_text())
    assert {key: profile[key] for key in ("dataset", "model", "augment")} == {
        "dataset": "cifar10",
        "model": "resnet18",
        "augment": "crop-flip",
    }
    config = {
        **pyproject_defaults(REPO / "pyproject.toml"),
        **profile,
        **TINY,
        "data-root": str(root),
        "results-dir": str(tmp_path / "results"),
        "run-name": "cifar",
    }
    run_inprocess(config, 3)

    folder = tmp_path / "results" / "cifar"
    results = RunResults.read(folder)
    assert sorted(results.rounds) == [0, 1, 2]
    assert 0.0 <= results.rounds[2]["accuracy"] <= 1.0
    assert "post-kd-accuracy" in results.rounds[2]  # Mosaic distilled into the ResNet-18
    written = json.loads((folder / "config.json").read_text())
    assert (written["model"], written["augment"]) == ("resnet18", "crop-flip")
