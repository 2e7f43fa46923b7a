"""Clients that stay inside the wire's rules: each attack is refused or bounded by a named rule."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Message, MetricRecord

from common.config import parse_run_config
from common.wire import ARRAYS, CLIENT, LABEL_COUNTS, METRICS
from server_app.defences import (
    above_median,
    capped_sizes,
    claim_scores,
    computes_finite,
    partition_claims,
    scale_counts,
    unsupported_claims,
    update_norm,
)
from server_app.strategies import teacher
from server_app.strategies.base import RoundLog
from tests.fakedata import tiny_run_config, write_fake_fashion_mnist
from tests.runs import assert_same_state, build_strategy, error_reply, final_model, read_json, run

FEDAVG_2_ROUNDS = {"strategy": "fedavg", "num_rounds": 2}
MOSAIC_2_ROUNDS = {"strategy": "mosaic", "num_rounds": 2, "kd_round": 2, "proto_start_round": 1}


# --- the rules, alone ------------------------------------------------------------------------


def test_above_median_flags_only_what_exceeds_the_ratio() -> None:
    assert above_median([1.0, 1.2, 0.9, 100.0], 10) == [False, False, False, True]
    assert above_median([1.0, 100.0], 0) == [False, False]  # 0: off


def test_capped_sizes_bound_each_weight_by_the_median_and_leave_the_rest() -> None:
    assert capped_sizes([100, 120, 80, 10**7], 3) == [100.0, 120.0, 80.0, 330.0]
    assert capped_sizes([100, 10**7], 0) == [100.0, 1e7]


def test_scaled_counts_keep_each_clients_class_shares() -> None:
    counts = np.array([[10, 30, 0], [1000, 0, 1000]])
    scaled = scale_counts(counts, [40, 500])
    np.testing.assert_allclose(scaled, [[10, 30, 0], [250, 0, 250]])


def test_a_partition_stays_with_its_owner_while_the_owner_takes_part() -> None:
    owners, refused = partition_claims([(1, 0), (2, 1)], {}, {1, 2})
    assert owners == {0: 1, 1: 2} and refused == set()
    owners, refused = partition_claims([(1, 0), (3, 0)], owners, {1, 2, 3})
    assert owners[0] == 1 and refused == {3}
    owners, refused = partition_claims([(4, 0)], owners, {2, 4})  # node 1 left: 4 took over
    assert owners[0] == 4 and refused == set()
    _, refused = partition_claims([(6, 5), (5, 5)], {}, {5, 6})  # two new claimants: lowest id
    assert refused == {6}


def test_update_norm_and_finite_outputs() -> None:
    sent = {"w": torch.zeros(3), "n": torch.tensor(4)}
    assert update_norm({"w": torch.tensor([3.0, 4.0, 0.0]), "n": torch.tensor(9)}, sent) == 5.0
    model = torch.nn.Linear(3, 2)
    assert computes_finite(model, torch.ones(2, 3))
    with torch.no_grad():
        model.weight.fill_(3e38)
    assert not computes_finite(model, torch.ones(2, 3))


def _calls(labels: list[int], num_classes: int = 4) -> torch.Tensor:
    """Logits [n, C] that call sample j ``labels[j]`` with near certainty."""
    return 20.0 * torch.nn.functional.one_hot(torch.tensor(labels), num_classes).float()


def test_claim_scores_reward_ranking_a_class_first_and_ignore_a_clients_own_generator() -> None:
    truth = [0] * 5 + [1] * 5 + [2] * 5  # generator 0's samples as its owner (model 0) calls them
    honest = _calls(truth)
    everything_is_2 = _calls([2] * 15)
    shifted = _calls([(t + 1) % 4 for t in truth])
    outputs = [torch.stack([honest, everything_is_2, shifted], dim=1)]  # [15, K=3, C=4]
    scores = claim_scores(outputs, owners=[0], min_samples=4)
    assert np.isnan(scores[0]).all()  # its own generator vouches for nothing
    np.testing.assert_allclose(scores[1, :3], [0.5, 0.5, 0.5])  # calls all 2: chance
    # 1s called 2 and 2s called 3, while 0s are called 1 and 1s 2: ranked under the others
    np.testing.assert_allclose(scores[2, :3], [0.5, 0.25, 0.25])
    assert np.isnan(scores[:, 3]).all()  # no sample of class 3: nothing to say
    # the best generator of another owner decides: a second, honest view lifts model 1's class 2
    second = torch.stack([_calls(truth), _calls(truth), _calls(truth)], dim=1)
    assert claim_scores([*outputs, second], owners=[0, 2])[1, 2] == 1.0


def test_a_model_that_knows_few_classes_still_backs_them() -> None:
    """Under strong label skew a client's model knows two classes and calls everything one of
    them; it still ranks its classes' samples first, so its claims stand."""
    truth = [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    narrow = torch.stack(
        [
            torch.tensor([4.0, 0.0, 1.0, 0.0])
            if t == 0
            else torch.tensor([0.0, 4.0, 1.0, 0.0])
            if t == 1
            else torch.tensor([1.0, 1.5, 0.0, 0.0])
            for t in truth
        ]
    )
    outputs = [torch.stack([_calls(truth, 4), narrow], dim=1)]
    scores = claim_scores(outputs, owners=[0])
    assert scores[1, 0] == 1.0 and scores[1, 1] == 1.0


def test_unbacked_claims_are_refused_unless_no_claimant_of_the_class_is_left() -> None:
    counts = np.array([[50, 3, 0], [40, 7, 9], [60, 0, 2]])
    scores = np.array([[0.9, 0.1, np.nan], [0.2, 0.8, 0.1], [0.95, np.nan, 0.0]])
    refused = unsupported_claims(counts, scores, 0.5)
    # client 1's class 0 goes; client 0's class 1 goes; class 2 has no claimant left: all stand
    np.testing.assert_array_equal(
        refused, [[False, True, False], [True, False, False], [False, False, False]]
    )


def test_a_flipped_model_loses_the_weight_of_the_classes_it_cannot_recognise(
    tmp_path, monkeypatch
) -> None:
    """The server's check wired end to end, on crafted outputs: each generator's samples carry
    their class, client 2's model calls every class the next one (trained on flipped labels)."""
    cfg = tiny_run_config(tmp_path, tmp_path, strategy="feddf", min_claim_agreement=0.6)
    strategy = build_strategy(parse_run_config(cfg))
    truths = {0: [0] * 8 + [1] * 8 + [2] * 8, 1: [0] * 8 + [2] * 8, 2: [1] * 8 + [2] * 8}

    def fake_models(states):
        def forward(images: torch.Tensor) -> torch.Tensor:
            truth = images[:, 0].long().tolist()
            flipped = [(t + 1) % 4 for t in truth]
            return torch.stack([_calls(truth), _calls(truth), _calls(flipped)], dim=1)

        return forward

    monkeypatch.setattr(strategy, "client_models", fake_models)
    monkeypatch.setattr(strategy, "generator_of", lambda pid: torch.nn.Identity())
    monkeypatch.setattr(teacher, "generator_to_classifier_input", lambda x, info: x)
    monkeypatch.setattr(
        teacher,
        "draw_samples",
        lambda generators, n, seed: [
            torch.tensor(truths[g], dtype=torch.float)[:, None] for g in truths
        ],
    )
    monkeypatch.setattr(strategy, "full_size_states", lambda *args: ([{}] * 3, None))
    kd_round = strategy.teacher_rounds()[0]
    strategy.rounds[kd_round] = RoundLog()
    counts = np.array([[30, 30, 30, 0], [30, 0, 30, 0], [0, 30, 30, 0]])
    accepted = [
        SimpleNamespace(
            node=10 + p,
            reply=SimpleNamespace(
                partition_id=p,
                num_examples=60,
                label_counts=counts[p].tolist(),
                sub_model=None,
                generator_state={},
            ),
        )
        for p in truths
    ]
    assert strategy.client_weights(accepted) == [None, None, None]
    strategy.keep_replies(kd_round, accepted)  # the check runs before the round's average
    # client 2's own generator, labelled by its flipped model, cannot vouch for it, and the
    # honest generators' samples show it calls 0s 1 and 1s 2: both its claims go
    np.testing.assert_array_equal(
        strategy._unbacked, [[False] * 4, [False] * 4, [False, True, True, False]]
    )
    assert strategy.rounds[kd_round].bounded == {12: "label-claim-unbacked: classes [1, 2]"}
    # its FedAvg weight, in this round's average already, is the share the check backs: none
    assert strategy.client_weights(accepted) == [None, None, 1]


# --- whole runs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def without_node_3(data_root, tmp_path_factory) -> Path:
    """FedAvg, 2 rounds, node 3 answering with an error every round: the clean reference."""
    return run(data_root, tmp_path_factory.mktemp("ref"), tamper=error_reply(3), **FEDAVG_2_ROUNDS)[
        1
    ]


def _train_replies_of(node: int, change):
    def tamper(node_id: int, reply: Message) -> Message:
        if node_id == node and reply.metadata.message_type == "train" and not reply.has_error():
            change(reply)
        return reply

    return tamper


def _refused_every_round(folder: Path, rule: str) -> None:
    for entry in read_json(folder, "participation.json").values():
        assert entry["rejected"] == {"3": rule}, entry


@pytest.mark.integration
def test_a_node_claiming_another_nodes_partition_is_refused(data_root, tmp_path, without_node_3):
    def claim_partition_0(reply: Message) -> None:
        reply.content[CLIENT] = ConfigRecord({"partition-id": 0})

    _, folder = run(
        data_root, tmp_path, tamper=_train_replies_of(3, claim_partition_0), **FEDAVG_2_ROUNDS
    )
    _refused_every_round(folder, "partition-claimed")
    assert_same_state(final_model(folder), final_model(without_node_3))


@pytest.mark.integration
def test_label_counts_that_change_between_rounds_are_refused(data_root, tmp_path) -> None:
    rounds_seen = []

    def shift_a_count_in_round_2(reply: Message) -> None:
        rounds_seen.append(1)
        if len(rounds_seen) == 2:
            counts = list(reply.content[LABEL_COUNTS]["counts"])
            held = int(np.argmax(counts))
            counts[held] -= 1
            counts[(held + 1) % len(counts)] += 1
            reply.content[LABEL_COUNTS] = MetricRecord({"counts": counts})

    _, folder = run(
        data_root,
        tmp_path,
        tamper=_train_replies_of(3, shift_a_count_in_round_2),
        **FEDAVG_2_ROUNDS,
    )
    participation = read_json(folder, "participation.json")
    assert participation["1"]["rejected"] == {}
    assert participation["2"]["rejected"] == {"3": "label-counts-changed"}


@pytest.mark.integration
def test_a_negative_batchnorm_variance_never_reaches_the_model(data_root, tmp_path, without_node_3):
    def negative_variance(reply: Message) -> None:
        arrays = reply.content[ARRAYS]
        key = next(k for k in arrays if k.endswith("running_var"))
        arrays[key] = Array(np.full(arrays[key].shape, -1e30, np.float32))

    _, folder = run(
        data_root, tmp_path, tamper=_train_replies_of(3, negative_variance), **FEDAVG_2_ROUNDS
    )
    _refused_every_round(folder, "weights-batchnorm")
    assert_same_state(final_model(folder), final_model(without_node_3))


def _scaled(factor: float):
    """Every trained weight (not the BatchNorm statistics) multiplied by ``factor``: an update
    far from the model sent, like a boosted one (w = g + f (w - g)) with g small."""

    def change(reply: Message) -> None:
        arrays = reply.content[ARRAYS]
        for key in arrays:
            values = arrays[key].numpy()
            if values.dtype == np.float32 and not key.endswith(("running_mean", "running_var")):
                arrays[key] = Array((factor * values).astype(np.float32))

    return change


@pytest.mark.integration
def test_an_update_far_above_the_rounds_median_is_refused_when_bounded(data_root, tmp_path):
    tamper = _train_replies_of(3, _scaled(100.0))
    _, bounded = run(
        data_root, tmp_path / "on", tamper=tamper, max_update_ratio=10.0, **FEDAVG_2_ROUNDS
    )
    _refused_every_round(bounded, "update-norm")
    _, unbounded = run(data_root, tmp_path / "off", tamper=tamper, **FEDAVG_2_ROUNDS)
    assert read_json(unbounded, "participation.json")["1"]["rejected"] == {}


@pytest.mark.integration
@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean", "multi-krum"])
def test_a_robust_aggregation_keeps_a_boosted_update_from_moving_the_model(
    data_root, tmp_path, aggregation
) -> None:
    tamper = _train_replies_of(3, _scaled(100.0))
    options = {**FEDAVG_2_ROUNDS, "trim_fraction": 0.34}
    _, robust = run(data_root, tmp_path / "r", tamper=tamper, aggregation=aggregation, **options)
    _, mean = run(data_root, tmp_path / "m", tamper=tamper, **options)
    for folder in (robust, mean):
        assert read_json(folder, "participation.json")["1"]["rejected"] == {}  # accepted
    robust_state, mean_state = final_model(robust), final_model(mean)
    largest = {
        name: max(float(s[k].abs().max()) for k in s if s[k].is_floating_point())
        for name, s in (("robust", robust_state), ("mean", mean_state))
    }
    assert largest["robust"] < 0.1 * largest["mean"]


@pytest.mark.integration
def test_inflated_counts_are_capped_at_the_weight_ratio(data_root, tmp_path) -> None:
    inflation = 10**6

    def inflate(reply: Message) -> None:
        counts = list(reply.content[LABEL_COUNTS]["counts"])
        counts[int(np.argmax(counts))] += inflation
        reply.content[LABEL_COUNTS] = MetricRecord({"counts": counts})
        reply.content[METRICS]["num-examples"] = (
            int(reply.content[METRICS]["num-examples"]) + inflation
        )

    _, capped = run(
        data_root,
        tmp_path / "on",
        tamper=_train_replies_of(3, inflate),
        max_weight_ratio=2.0,
        **MOSAIC_2_ROUNDS,
    )
    _, uncapped = run(
        data_root, tmp_path / "off", tamper=_train_replies_of(3, inflate), **MOSAIC_2_ROUNDS
    )
    _, honest = run(data_root, tmp_path / "honest", **MOSAIC_2_ROUNDS)

    def distance(folder: Path) -> float:
        a, b = final_model(folder), final_model(honest)
        return sum(
            float((a[k].double() - b[k].double()).norm()) for k in a if a[k].is_floating_point()
        )

    assert distance(capped) < distance(uncapped)
    rounds = read_json(capped, "metrics.json")["rounds"]
    assert np.isfinite(rounds["2"]["teacher-accuracy"])


@pytest.mark.integration
def test_an_aggregate_that_computes_inf_is_not_adopted(data_root, tmp_path) -> None:
    def huge_weights(reply: Message) -> None:
        arrays = reply.content[ARRAYS]
        key = next(k for k in arrays if k.endswith("weight") and len(arrays[k].shape) == 2)
        arrays[key] = Array(np.full(arrays[key].shape, 3e38, np.float32))

    def every_node(node: int, reply: Message) -> Message:
        return _train_replies_of(node, huge_weights)(node, reply)

    _, folder = run(data_root, tmp_path, tamper=every_node, **FEDAVG_2_ROUNDS)
    participation = read_json(folder, "participation.json")
    assert all(e["skipped"].startswith("aggregate-finite") for e in participation.values())
    state = final_model(folder)
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


@pytest.mark.integration
def test_the_attack_benchmark_runs_an_attack_and_names_the_rule(data_root, tmp_path) -> None:
    from benchmarks.attacks import ATTACKS, LAST_ROUNDS, attacker, render, run_one
    from benchmarks.reply_cache import ReplyCache
    from tests.fakedata import tiny_run_config

    config = tiny_run_config(data_root, tmp_path, **FEDAVG_2_ROUNDS)
    cache = ReplyCache(tmp_path / "client-replies")
    clean = run_one({**config, "run-name": "clean"}, 3, None, cache)
    computed = cache.computed
    attacked = run_one(
        {**config, "run-name": "bn"}, 3, attacker(3, ATTACKS["negative-bn-variance"]), cache
    )
    # round 1 sends both runs the same message: the attacked run reuses the clean run's
    # replies, and the tamper still changes node 3's on its way to the server
    assert cache.reused >= 3 and cache.computed < 2 * computed
    assert attacked["rules"] == ["weights-batchnorm"] and clean["rules"] == []
    row = {"attack": "negative-bn-variance", "seed": 0, "defences": "off", **attacked}
    row.update(clean=clean["accuracy"], **{"clean-last-rounds": clean["last-rounds"]})
    table = render([row], "t")
    assert "| negative-bn-variance | 0 | off |" in table and "weights-batchnorm" in table
    rounds = read_json(Path(config["results-dir"]) / "clean", "metrics.json")["rounds"]
    tail = [rounds[r]["accuracy"] for r in sorted(rounds, key=int) if int(r) > 0][-LAST_ROUNDS:]
    assert clean["last-rounds"] == pytest.approx(sum(tail) / len(tail))
