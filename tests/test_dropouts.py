"""Dropouts and stragglers: rounds below ``min-replies`` are skipped, never a crash or a hang."""

from pathlib import Path

import pytest
import torch
from flwr.app import Message

from tests.fakedata import write_fake_fashion_mnist
from tests.faults import faulty_client_app
from tests.runs import (
    NUM_NODES,
    Tamper,
    assert_same_state,
    error_reply,
    final_model,
    no_reply,
    read_json,
    run,
)

pytestmark = pytest.mark.integration  # whole runs of the app in this process


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data"))


def _drop_in_round(nodes: set[int], server_round: int) -> Tamper:
    """``nodes`` do not answer in ``server_round`` (every node gets one message a round)."""
    calls = dict.fromkeys(range(1, NUM_NODES + 1), 0)

    def tamper(node_id: int, reply: Message) -> Message | None:
        calls[node_id] += 1
        return None if calls[node_id] == server_round and node_id in nodes else reply

    return tamper


def test_round_below_min_replies_is_skipped_and_the_next_one_runs(data_root, tmp_path) -> None:
    _, folder = run(
        data_root,
        tmp_path,
        tamper=_drop_in_round({2, 3}, 1),
        strategy="fedavg",
        num_rounds=2,
        min_nodes=NUM_NODES,
        min_replies=2,
    )

    participation = read_json(folder, "participation.json")
    first, second = participation["1"], participation["2"]
    assert sorted(first["sampled"]) == [1, 2, 3]
    assert first["replied"] == [1]
    assert sorted(first["missing"]) == [2, 3]
    assert first["skipped"] == "1 accepted replies, min-replies is 2"
    assert sorted(second["replied"]) == [1, 2, 3]
    assert second["missing"] == []
    assert second["skipped"] == ""

    rounds = read_json(folder, "metrics.json")["rounds"]
    assert (rounds["1"]["skipped"], rounds["1"]["missing"], rounds["2"]["skipped"]) == (1, 2, 0)
    assert rounds["1"]["loss"] == rounds["0"]["loss"]  # round 1 kept the initial model
    assert rounds["2"]["loss"] != rounds["0"]["loss"]
    # Node 1's reply of the skipped round was kept nowhere: only round 2 filled label counts.
    assert sorted(read_json(folder, "label_counts.json")) == ["client-0", "client-1", "client-2"]


def test_run_where_no_node_ever_answers_completes_with_the_initial_model(
    data_root, tmp_path
) -> None:
    _, folder = run(data_root, tmp_path, tamper=no_reply({1, 2, 3}), strategy="fedavg")

    participation = read_json(folder, "participation.json")
    assert sorted(participation, key=int) == ["1", "2", "3"]
    for entry in participation.values():
        assert sorted(entry["missing"]) == [1, 2, 3]
        assert entry["skipped"] == "0 accepted replies, min-replies is 1"
    rounds = read_json(folder, "metrics.json")["rounds"]
    assert {entry["loss"] for entry in rounds.values()} == {rounds["0"]["loss"]}
    state = final_model(folder)
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert read_json(folder, "label_counts.json") == {}


def test_straggler_past_the_round_timeout_is_left_out(data_root, tmp_path) -> None:
    """Node 3 answers a second after the timeout: the round goes on without its reply."""
    kwargs = {"strategy": "fedavg", "num_rounds": 1, "round_timeout": 1.0}
    straggler = faulty_client_app("straggle", partition=2)
    _, late = run(data_root, tmp_path / "late", client_app=straggler, **kwargs)
    _, dropped = run(data_root, tmp_path / "drop", tamper=error_reply(3), **kwargs)

    entry = read_json(late, "participation.json")["1"]
    assert entry["missing"] == [3]
    assert sorted(entry["replied"]) == [1, 2]
    assert entry["skipped"] == ""
    assert_same_state(final_model(late), final_model(dropped))


def test_skipped_kd_round_means_no_distillation_and_the_run_goes_on(data_root, tmp_path) -> None:
    _, folder = run(
        data_root,
        tmp_path,
        tamper=_drop_in_round({3}, 2),
        strategy="mosaic",
        num_rounds=3,
        kd_round=2,
        min_nodes=NUM_NODES,
        min_replies=NUM_NODES,
    )

    participation = read_json(folder, "participation.json")
    assert [bool(participation[r]["skipped"]) for r in ("1", "2", "3")] == [False, True, False]
    rounds = read_json(folder, "metrics.json")["rounds"]
    assert sorted(rounds, key=int) == ["0", "1", "2", "3"]
    assert rounds["2"]["loss"] == rounds["1"]["loss"]
    assert rounds["3"]["loss"] != rounds["2"]["loss"]
    assert not any(key.startswith(("teacher-", "post-kd-")) for key in rounds["2"])
    assert not (folder / "generator_samples").exists()  # the round-2 generators were not kept
