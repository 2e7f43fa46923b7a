"""Whole runs of the real ServerApp main loop against in-process ClientApps, on fake data."""

import csv
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import DEFAULT_TTL, Array, Message, Metadata, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

import client_app.app as client_module
from common.wire import ARRAYS, LABEL_COUNTS, OPTIONAL_KEYS, REQUIRED_KEYS
from server_app.results import load_model
from tests.fakedata import write_fake_fashion_mnist
from tests.runs import NUM_NODES, assert_same_state, error_reply, final_model, read_json, run

pytestmark = pytest.mark.integration  # whole runs of the app in this process

KD_FIGURES = (
    "teacher-accuracy",
    "pre-kd-accuracy",
    "post-kd-accuracy",
    "meta-seconds",
    "kd-seconds",
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data"))


def _nan_weights(node: int):
    """A tamper that puts NaN into the first float weight of ``node``'s train reply."""

    def tamper(node_id: int, reply: Message) -> Message:
        if node_id == node and not reply.has_error() and ARRAYS in reply.content:
            arrays = reply.content[ARRAYS]
            key = next(k for k in arrays if arrays[k].dtype.startswith("float"))
            poisoned = arrays[key].numpy().copy()
            poisoned.reshape(-1)[0] = np.nan
            arrays[key] = Array(poisoned)
        return reply

    return tamper


def _superlink_error_reply(node: int):
    """A tamper that replaces ``node``'s reply with the error the SuperLink sends for a node it
    lost: from the SuperLink's own node id, answering the instruction."""

    def tamper(node_id: int, reply: Message) -> Message:
        if node_id != node:
            return reply
        instruction = Metadata(
            run_id=reply.metadata.run_id,
            message_id=reply.metadata.reply_to_message_id,
            src_node_id=SUPERLINK_NODE_ID,
            dst_node_id=node_id,
            reply_to_message_id="",
            group_id=reply.metadata.group_id,
            created_at=time.time(),
            ttl=DEFAULT_TTL,
            message_type=reply.metadata.message_type,
        )
        return create_message_error_unavailable_res_message(instruction, "node_unavail")

    return tamper


# --- complete runs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mosaic_run(data_root, tmp_path_factory):
    """One Mosaic run: 3 rounds, prototypes in round 2 (never round 1), generators and KD at
    round 2."""
    return run(data_root, tmp_path_factory.mktemp("results"), strategy="mosaic")


def test_mosaic_run_writes_the_results_folder(mosaic_run, data_root) -> None:
    _, folder = mosaic_run
    config = read_json(folder, "config.json")
    assert config["strategy"] == "mosaic"
    assert config["data-root"] == str(data_root)
    for name in ("metrics.json", "label_counts.json", "participation.json", "accuracy.png"):
        assert (folder / name).stat().st_size > 0, name
    samples = sorted(p.name for p in (folder / "generator_samples").iterdir())
    assert samples == [f"client-{i}.png" for i in range(NUM_NODES)]


def test_mosaic_run_leaves_a_log_a_table_a_partition_picture_and_a_page(mosaic_run) -> None:
    _, folder = mosaic_run
    log_text = (folder / "run.log").read_text()
    assert "Results go to" in log_text and "final test accuracy" in log_text
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    metrics = read_json(folder, "metrics.json")["rounds"]
    assert [row["round"] for row in rows] == sorted(metrics, key=int)
    assert float(rows[-1]["accuracy"]) == metrics[rows[-1]["round"]]["accuracy"]
    assert "teacher-accuracy" in rows[0]  # a teacher round's figures are columns too
    assert (folder / "partition.png").read_bytes().startswith(b"\x89PNG")
    page = (folder / "report.html").read_text()
    final = metrics[rows[-1]["round"]]["accuracy"]
    assert f"{final:.4f}" in page and "teacher-accuracy" in page
    assert page.count("data:image/png;base64,") == 2 + NUM_NODES  # curve, split, samples
    # self-contained: no script and nothing fetched from anywhere
    assert "<script" not in page and "http" not in page and 'src="/' not in page
    assert "<td class=key>strategy</td><td class=key>mosaic</td>" in page


def test_load_model_gives_back_the_final_model_of_a_results_folder(mosaic_run) -> None:
    _, folder = mosaic_run
    model = load_model(folder)
    assert not model.training
    assert_same_state(model.state_dict(), final_model(folder))


def test_mosaic_metrics_cover_every_round_and_the_kd_figures(mosaic_run) -> None:
    _, folder = mosaic_run
    metrics = read_json(folder, "metrics.json")
    rounds = metrics["rounds"]
    assert sorted(rounds, key=int) == ["0", "1", "2", "3"]
    for entry in rounds.values():
        assert 0.0 <= entry["accuracy"] <= 1.0
        assert np.isfinite(entry["loss"])
    kd = rounds["2"]
    for key in KD_FIGURES:
        assert key in kd, key
    assert all(key not in rounds[r] for r in ("1", "3") for key in KD_FIGURES)
    assert kd["replied"] == NUM_NODES
    assert kd["rejected"] == 0
    assert kd["failed"] == 0
    assert metrics["phase-seconds"]["total"] >= 0


def test_mosaic_label_counts_and_participation(mosaic_run) -> None:
    _, folder = mosaic_run
    counts = read_json(folder, "label_counts.json")
    assert sorted(counts) == [f"client-{i}" for i in range(NUM_NODES)]
    assert all(len(c) == 10 for c in counts.values())
    assert sum(sum(c) for c in counts.values()) == 600  # partitions cover the train split

    participation = read_json(folder, "participation.json")
    assert sorted(participation, key=int) == ["1", "2", "3"]
    for entry in participation.values():
        assert sorted(entry["replied"]) == [1, 2, 3]
        assert entry["rejected"] == {}
        assert entry["failed"] == {}
        assert sorted(entry["partitions"].values()) == [0, 1, 2]


def test_mosaic_final_model_loads_safely(mosaic_run) -> None:
    _, folder = mosaic_run
    state = final_model(folder)
    assert state
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_mosaic_run_sends_only_allowed_records(mosaic_run) -> None:
    grid, _ = mosaic_run
    train_replies = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train_replies) == 3 * NUM_NODES
    for reply in train_replies:
        assert REQUIRED_KEYS <= set(reply.content.keys()) <= REQUIRED_KEYS | OPTIONAL_KEYS
    with_generator = [m for m in train_replies if "generator" in m.content]
    assert len(with_generator) == NUM_NODES  # once per client, in the kd-round
    with_prototypes = [m for m in train_replies if "prototypes" in m.content]
    assert len(with_prototypes) == NUM_NODES  # round 2 only: not round 1 (untrained), nor 3


@pytest.mark.parametrize("strategy", ["mosaic", "label-share"])
def test_kd_every_distills_again_with_the_prototypes_of_each_round(
    data_root, tmp_path, strategy
) -> None:
    """kd-every = 1: distillation after rounds 2 and 3, prototypes in both; a teacher that is
    not distilled is still judged once, at kd-round."""
    grid, folder = run(data_root, tmp_path, strategy=strategy, kd_every=1)
    rounds = read_json(folder, "metrics.json")["rounds"]
    with_teacher = [r for r in ("1", "2", "3") if "teacher-accuracy" in rounds[r]]
    train_replies = [m for m in grid.sent if m.metadata.message_type == "train"]
    with_prototypes = [m for m in train_replies if "prototypes" in m.content]
    if strategy == "mosaic":
        assert with_teacher == ["2", "3"]
        assert all(key in rounds["3"] for key in KD_FIGURES)
        assert len(with_prototypes) == 2 * NUM_NODES
        phases = read_json(folder, "metrics.json")["phase-seconds"]
        kd_seconds = rounds["2"]["kd-seconds"] + rounds["3"]["kd-seconds"]
        assert phases["distillation"] == pytest.approx(kd_seconds, abs=0.1)
    else:
        assert with_teacher == ["2"]
        assert not with_prototypes


def test_fedavg_run_has_no_mosaic_figures(data_root, tmp_path) -> None:
    _, folder = run(data_root, tmp_path, strategy="fedavg")
    rounds = read_json(folder, "metrics.json")["rounds"]
    assert sorted(rounds, key=int) == ["0", "1", "2", "3"]
    for entry in rounds.values():
        assert not any(key.startswith(("teacher-", "pre-kd-", "post-kd-")) for key in entry)
        assert "kd-seconds" not in entry
    assert not (folder / "generator_samples").exists()
    assert final_model(folder)


def test_fedprox_run_completes(data_root, tmp_path) -> None:
    _, folder = run(data_root, tmp_path, strategy="fedprox", proximal_mu=0.1, num_rounds=1)
    assert sorted(read_json(folder, "metrics.json")["rounds"], key=int) == ["0", "1"]


# --- faults ----------------------------------------------------------------------------------


def test_nan_reply_is_rejected_and_never_averaged(data_root, tmp_path) -> None:
    _, poisoned = run(
        data_root, tmp_path / "nan", tamper=_nan_weights(3), strategy="fedavg", num_rounds=1
    )
    _, dropped = run(
        data_root, tmp_path / "drop", tamper=error_reply(3), strategy="fedavg", num_rounds=1
    )

    participation = read_json(poisoned, "participation.json")["1"]
    assert participation["rejected"] == {"3": "weights-finite"}
    assert sorted(participation["replied"]) == [1, 2]
    assert read_json(dropped, "participation.json")["1"]["failed"] == {"3": "dropped"}
    # Rejected means never averaged: the same model as if node 3 had not answered at all.
    assert_same_state(final_model(poisoned), final_model(dropped))
    assert np.isfinite(read_json(poisoned, "metrics.json")["rounds"]["1"]["loss"])


def test_a_node_the_superlink_lost_is_recorded_as_that_node(data_root, tmp_path) -> None:
    """The SuperLink's error reply comes from node id 1; participation names the lost node."""
    _, folder = run(
        data_root,
        tmp_path / "lost",
        tamper=_superlink_error_reply(2),
        strategy="fedavg",
        num_rounds=1,
    )
    participation = read_json(folder, "participation.json")["1"]
    assert list(participation["failed"]) == ["2"]
    assert sorted(participation["replied"]) == [1, 3]
    assert participation["missing"] == []


def _huge_weights_and_bad_counts(node: int):
    """A tamper that makes ``node``'s weights huge but finite and its label counts malformed."""

    def tamper(node_id: int, reply: Message) -> Message:
        if node_id == node and not reply.has_error():
            arrays = reply.content[ARRAYS]
            for key in list(arrays):
                if arrays[key].dtype.startswith("float"):
                    arrays[key] = Array(arrays[key].numpy() * 0 + 1e6)
            counts = reply.content[LABEL_COUNTS]["counts"]
            reply.content[LABEL_COUNTS] = MetricRecord({"counts": [*counts, 0]})
        return reply

    return tamper


def test_rejected_reply_stays_out_of_the_mosaic_teacher(data_root, tmp_path) -> None:
    """NaN weights and huge finite weights, both rejected: if either reached FedAvg, the
    experts or the generator pool, the two runs would differ (or the model would be NaN)."""
    kwargs = {"strategy": "mosaic", "num_rounds": 2}
    _, poisoned = run(data_root, tmp_path / "nan", tamper=_nan_weights(2), **kwargs)
    garbage_tamper = _huge_weights_and_bad_counts(2)
    _, garbage = run(data_root, tmp_path / "huge", tamper=garbage_tamper, **kwargs)

    assert read_json(poisoned, "participation.json")["2"]["rejected"] == {"2": "weights-finite"}
    assert read_json(garbage, "participation.json")["2"]["rejected"] == {"2": "label-counts"}
    final = final_model(poisoned)
    assert_same_state(final, final_model(garbage))
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
    kd = read_json(poisoned, "metrics.json")["rounds"]["2"]
    assert all(np.isfinite(kd[key]) for key in KD_FIGURES)
    # The rejected node's generator (partition 1) was never kept either.
    samples = sorted(p.name for p in (poisoned / "generator_samples").iterdir())
    assert samples == ["client-0.png", "client-2.png"]
    assert sorted(read_json(poisoned, "label_counts.json")) == ["client-0", "client-2"]


def test_rejected_and_failed_replies_leave_the_same_mosaic_run(data_root, tmp_path) -> None:
    kwargs = {"strategy": "mosaic", "num_rounds": 2}
    _, poisoned = run(data_root, tmp_path / "nan", tamper=_nan_weights(2), **kwargs)
    _, dropped = run(data_root, tmp_path / "drop", tamper=error_reply(2), **kwargs)

    assert read_json(dropped, "participation.json")["2"]["failed"] == {"2": "dropped"}
    assert_same_state(final_model(poisoned), final_model(dropped))


def test_client_exception_becomes_an_error_reply_and_the_run_goes_on(
    data_root, tmp_path, monkeypatch
) -> None:
    real_loader = client_module.load_client_partition

    def flaky_loader(name, root, partition_id, *args, **kwargs):
        if partition_id == 2:
            raise OSError("disk on fire")
        return real_loader(name, root, partition_id, *args, **kwargs)

    monkeypatch.setattr(client_module, "load_client_partition", flaky_loader)
    _, folder = run(data_root, tmp_path, strategy="mosaic")

    participation = read_json(folder, "participation.json")
    for entry in participation.values():
        assert entry["failed"] == {"3": "OSError: disk on fire"}
        assert sorted(entry["replied"]) == [1, 2]
    kd = read_json(folder, "metrics.json")["rounds"]["2"]
    assert all(key in kd for key in KD_FIGURES)
    assert sorted(read_json(folder, "label_counts.json")) == ["client-0", "client-1"]


def test_reply_with_an_extra_metric_is_rejected_and_the_run_goes_on(data_root, tmp_path) -> None:
    def extra_metric(node_id: int, reply: Message) -> Message:
        if node_id == 3 and not reply.has_error():
            reply.content["metrics"]["smuggled"] = 1.0
        return reply

    _, folder = run(data_root, tmp_path, tamper=extra_metric, strategy="fedavg", num_rounds=1)
    assert 3 in [int(n) for n in read_json(folder, "participation.json")["1"]["rejected"]]


def test_round_with_every_reply_rejected_keeps_the_model(data_root, tmp_path) -> None:
    def poison_all(node_id: int, reply: Message) -> Message:
        return _nan_weights(node_id)(node_id, reply)

    _, folder = run(data_root, tmp_path, tamper=poison_all, strategy="fedavg", num_rounds=1)

    rounds = read_json(folder, "metrics.json")["rounds"]
    assert rounds["1"]["rejected"] == NUM_NODES
    assert rounds["1"]["accuracy"] == rounds["0"]["accuracy"]
    assert rounds["1"]["loss"] == rounds["0"]["loss"]


# --- reproducibility -------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["fedavg", "mosaic"])
def test_seeded_runs_are_reproducible(data_root, tmp_path, strategy) -> None:
    _, first = run(data_root, tmp_path / "a", strategy=strategy, num_rounds=2)
    _, second = run(data_root, tmp_path / "b", strategy=strategy, num_rounds=2)
    assert_same_state(final_model(first), final_model(second))


def test_the_order_replies_arrive_in_changes_no_bit(data_root, tmp_path) -> None:
    """Over a network replies arrive in another order every run: the server sorts them
    before anything is summed, so a shuffled arrival order gives the same model, bit for bit."""
    shuffler = np.random.default_rng(7)

    def shuffled(replies: list[Message]) -> list[Message]:
        return [replies[i] for i in shuffler.permutation(len(replies))]

    def reversed_order(replies: list[Message]) -> list[Message]:
        return replies[::-1]

    options = {"strategy": "mosaic", "num_rounds": 2, "kd_round": 2, "proto_start_round": 1}
    _, arrived_in_order = run(data_root, tmp_path / "a", **options)
    _, arrived_reversed = run(data_root, tmp_path / "b", reply_order=reversed_order, **options)
    _, arrived_shuffled = run(data_root, tmp_path / "c", reply_order=shuffled, **options)
    assert_same_state(final_model(arrived_in_order), final_model(arrived_reversed))
    assert_same_state(final_model(arrived_in_order), final_model(arrived_shuffled))
    participation = read_json(arrived_reversed, "participation.json")
    assert participation["2"]["replied"] == [1, 2, 3]  # recorded in partition order


def test_another_seed_gives_another_model(data_root, tmp_path) -> None:
    _, first = run(data_root, tmp_path / "a", strategy="fedavg", num_rounds=1, seed=0)
    _, second = run(data_root, tmp_path / "b", strategy="fedavg", num_rounds=1, seed=1)
    first_state, second_state = final_model(first), final_model(second)
    assert any(not torch.equal(t, second_state[k]) for k, t in first_state.items())


def test_partition_seed_keeps_the_split_while_the_training_seed_changes(
    data_root, tmp_path
) -> None:
    def fedavg(name: str, **seeds) -> tuple[dict, dict]:
        _, folder = run(data_root, tmp_path / name, strategy="fedavg", num_rounds=1, **seeds)
        return read_json(folder, "label_counts.json"), final_model(folder)

    counts, model = fedavg("a", seed=1, partition_seed=7)
    same_split, other_model = fedavg("b", seed=2, partition_seed=7)
    split_of_seed_1, _ = fedavg("c", seed=1)  # partition-seed -1: the split follows seed
    assert counts == same_split and counts != split_of_seed_1
    assert any(not torch.equal(t, other_model[k]) for k, t in model.items())


def test_a_malformed_evaluate_reply_is_rejected_and_logged(data_root, tmp_path) -> None:
    def nan_accuracy(node_id: int, reply: Message) -> Message:
        if node_id == 3 and reply.metadata.message_type == "evaluate":
            reply.content["metrics"]["accuracy"] = float("nan")
        return reply

    _, folder = run(
        data_root,
        tmp_path,
        tamper=nan_accuracy,
        strategy="fedavg",
        num_rounds=1,
        fraction_evaluate=1.0,
    )
    round_log = read_json(folder, "participation.json")["1"]
    assert round_log["evaluate_rejected"] == {"3": "accuracy"}
    assert sorted(round_log["replied"]) == [1, 2, 3]  # its train reply was fine
