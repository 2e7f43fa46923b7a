"""Checkpoint and resume: a run stopped after any round ends, once resumed, exactly as a run that
never stopped, and a checkpoint holds nothing that needs unpickling."""

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message

from common.config import ConfigError
from server_app.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tests.fakedata import tiny_run_config, write_fake_fashion_mnist
from tests.runs import NUM_NODES, Tamper, assert_same_state, final_model, read_json, run

pytestmark = pytest.mark.integration  # whole runs of the app in this process

REPO = Path(__file__).resolve().parents[1]
# fraction-train 0.5 samples 2 of the 3 nodes each round (FedAvg samples at least 2), so a
# resumed run that did not restore the server's RNG would sample other nodes than the original.
SAMPLED_PER_ROUND = 2
RUNS = {
    "mosaic": {
        "strategy": "mosaic",
        "num_rounds": 3,
        "kd_round": 2,
        "proto_start_round": 1,
        "fraction_train": 0.5,
    },
    "fedavg": {"strategy": "fedavg", "num_rounds": 3, "fraction_train": 0.5},
}


class Crash(BaseException):
    """Stops the server mid-round as a kill would: no ``except Exception`` catches it."""


def _crash_in_round(server_round: int) -> Tamper:
    """A tamper that stops the run at the first reply of ``server_round``."""
    replies: list[int] = []

    def tamper(node_id: int, reply: Message) -> Message:
        replies.append(node_id)
        if len(replies) == SAMPLED_PER_ROUND * (server_round - 1) + 1:
            raise Crash(f"stopped in round {server_round}")
        return reply

    return tamper


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory) -> dict[str, Path]:
    """The results folder of each run in ``RUNS``, run without a stop."""
    return {
        name: run(data_root, tmp_path_factory.mktemp(name), **overrides)[1]
        for name, overrides in RUNS.items()
    }


def _assert_same_run(resumed: Path, reference: Path) -> None:
    assert_same_state(final_model(resumed), final_model(reference))
    metrics, expected = (read_json(f, "metrics.json")["rounds"] for f in (resumed, reference))
    assert metrics.keys() == expected.keys()
    for server_round, entry in expected.items():  # every figure but wall times
        assert metrics[server_round].keys() == entry.keys()
        for key in (k for k in entry if not k.endswith("seconds")):
            assert metrics[server_round][key] == entry[key], (server_round, key)
    participation, expected = (read_json(f, "participation.json") for f in (resumed, reference))
    assert participation.keys() == expected.keys()
    for server_round, entry in expected.items():
        for key in ("sampled", "replied", "partitions"):
            assert participation[server_round][key] == entry[key], (server_round, key)
    assert read_json(resumed, "label_counts.json") == read_json(reference, "label_counts.json")


@pytest.mark.parametrize(
    ("name", "crash_round"),
    [("mosaic", 2), ("mosaic", 3), ("fedavg", 2)],
    ids=["mosaic-before-kd-round", "mosaic-after-kd-round", "fedavg"],
)
def test_resumed_run_ends_as_the_uninterrupted_run(
    data_root, tmp_path, uninterrupted, name, crash_round
) -> None:
    with pytest.raises(Crash):
        run(data_root, tmp_path, tamper=_crash_in_round(crash_round), **RUNS[name])
    folder = tmp_path / "test-run"
    assert load_checkpoint(folder)["round"] == crash_round - 1
    assert not (folder / "final_model.pt").exists()

    grid, folder = run(data_root, tmp_path, resume=True, **RUNS[name])

    train_replies = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train_replies) == SAMPLED_PER_ROUND * (RUNS[name]["num_rounds"] - crash_round + 1)
    _assert_same_run(folder, uninterrupted[name])
    if name == "mosaic":
        samples = sorted(p.name for p in (folder / "generator_samples").iterdir())
        reference = uninterrupted[name] / "generator_samples"
        assert samples == sorted(p.name for p in reference.iterdir())


def test_a_rejected_evaluate_reply_after_resume_is_filed_under_its_round(
    data_root, tmp_path
) -> None:
    """Every hook reads the run's round (Flower's counter restarts at 1 on resume)."""
    options = {"strategy": "fedavg", "num_rounds": 2, "fraction_evaluate": 1.0}
    train_replies: list[int] = []

    def crash_in_round_2(node_id: int, reply: Message) -> Message:
        if reply.metadata.message_type == "train":
            train_replies.append(node_id)
            if len(train_replies) == NUM_NODES + 1:
                raise Crash("stopped in round 2")
        return reply

    def nan_accuracy(node_id: int, reply: Message) -> Message:
        if node_id == 3 and reply.metadata.message_type == "evaluate":
            reply.content["metrics"]["accuracy"] = float("nan")
        return reply

    with pytest.raises(Crash):
        run(data_root, tmp_path, tamper=crash_in_round_2, **options)
    _, folder = run(data_root, tmp_path, tamper=nan_accuracy, resume=True, **options)

    participation = read_json(folder, "participation.json")
    assert participation["1"]["evaluate_rejected"] == {}
    assert participation["2"]["evaluate_rejected"] == {"3": "accuracy"}


KILL_IN_ROUND_3 = f"""
import json, os, signal, sys
import torch
from server_app.inprocess import run_inprocess
torch.set_num_threads(1)
replies = []
def kill_in_round_3(node_id, reply):
    replies.append(node_id)
    if len(replies) == {SAMPLED_PER_ROUND} * 2 + 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return reply
run_inprocess(json.loads(sys.argv[1]), {NUM_NODES}, tamper=kill_in_round_3)
"""


def test_killed_server_process_resumes_to_the_same_model(
    data_root, tmp_path, uninterrupted
) -> None:
    config = tiny_run_config(data_root, tmp_path, **RUNS["mosaic"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLWR_TELEMETRY_ENABLED": "0"}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_IN_ROUND_3, json.dumps(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert load_checkpoint(tmp_path / "test-run")["round"] == 2

    _, folder = run(data_root, tmp_path, resume=True, **RUNS["mosaic"])
    _assert_same_run(folder, uninterrupted["mosaic"])


def _copy_run(folder: Path, results: Path) -> Path:
    shutil.copytree(folder, results / folder.name)
    return results


def test_resuming_a_finished_run_sends_nothing_and_keeps_the_model(
    data_root, tmp_path, uninterrupted
) -> None:
    results = _copy_run(uninterrupted["fedavg"], tmp_path)
    grid, folder = run(data_root, results, resume=True, **RUNS["fedavg"])
    assert grid.sent == []
    _assert_same_run(folder, uninterrupted["fedavg"])


def test_resume_without_a_checkpoint_starts_at_round_one(data_root, tmp_path, uninterrupted):
    _, folder = run(data_root, tmp_path, resume=True, **RUNS["fedavg"])
    _assert_same_run(folder, uninterrupted["fedavg"])


def test_resume_with_another_config_is_refused_naming_the_keys(
    data_root, tmp_path, uninterrupted
) -> None:
    results = _copy_run(uninterrupted["fedavg"], tmp_path)
    with pytest.raises(ConfigError) as caught:
        run(data_root, results, resume=True, **{**RUNS["fedavg"], "seed": 1, "lr": 0.5})
    assert "\n  seed: 0 in the checkpoint, 1 now" in str(caught.value)
    assert "\n  lr: " in str(caught.value)


def _leaves(value):
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def test_checkpoint_holds_the_whole_server_state_as_plain_data(uninterrupted) -> None:
    checkpoint = load_checkpoint(uninterrupted["mosaic"])  # torch.load(weights_only=True)
    assert set(checkpoint) == {"round", "run-config", "global-model", "strategy", "metrics", "rng"}
    assert checkpoint["round"] == RUNS["mosaic"]["num_rounds"]
    assert set(checkpoint["strategy"]) == {
        "rounds",
        "label-counts",
        "prototype-bank",
        "generators",
        "meta-model",
        "widths",
        "tier-statistics",
        "backed-share",
    }
    assert sorted(checkpoint["metrics"]) == [0, 1, 2, 3]
    assert checkpoint["strategy"]["prototype-bank"]  # rounds 1 and 2 of the bank
    plain = (torch.Tensor, str, int, float, bool)
    assert all(isinstance(leaf, plain) for leaf in _leaves(checkpoint))


def test_checkpoint_with_an_object_to_unpickle_is_refused(tmp_path) -> None:
    torch.save({"round": 1, "payload": ConfigError("would run code")}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path)


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    save_checkpoint(tmp_path, {"round": 1, "weights": torch.ones(3)})

    def save_half_then_die(obj, handle) -> None:
        handle.write(b"half a checkpoint")
        raise Crash("killed while writing")

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(Crash):
        save_checkpoint(tmp_path, {"round": 2, "weights": torch.zeros(3)})

    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["round"] == 1
    assert torch.equal(checkpoint["weights"], torch.ones(3))


def test_rng_state_restores_every_generator(tmp_path) -> None:
    state = rng_state()
    path = save_checkpoint(tmp_path, {"rng": state})
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
