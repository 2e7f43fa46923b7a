"""Fault injection: one client (partition 2, node 3) misbehaves in every round of a Mosaic run.

Each run has two rounds: prototypes in both, generators and distillation in round 2. The run
must complete, reject the reply for the right rule, and end with exactly the model of a run
in which that node returned an error reply instead: a rejected reply never reaches FedAvg, the
prototype bank, the experts or the generator pool.
"""

from pathlib import Path

import pytest

from tests.fakedata import write_fake_fashion_mnist
from tests.faults import EXPECTED_RULES, FAULTS, faulty_client_app
from tests.runs import assert_same_state, error_reply, final_model, read_json, run

pytestmark = pytest.mark.integration  # whole runs of the app in this process

BAD_PARTITION = 2
BAD_NODE = str(BAD_PARTITION + 1)
GOOD_NODES = [1, 2]
MOSAIC_2_ROUNDS = {"strategy": "mosaic", "num_rounds": 2, "kd_round": 2, "proto_start_round": 1}
# Round 1 asks for no generator and no prototypes: added ones are unexpected there, wrong ones
# in round 2.
RULES_PER_ROUND = {mode: {1: rule, 2: rule} for mode, rule in EXPECTED_RULES.items()} | {
    "wrong-generator": {1: "generator-unexpected", 2: "generator-shape"},
    "oversized-prototypes": {
        1: "prototypes-unexpected",
        2: EXPECTED_RULES["oversized-prototypes"],
    },
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def without_bad_node(data_root, tmp_path_factory) -> Path:
    """The reference: the same run, with node 3 returning an error reply every round."""
    results = tmp_path_factory.mktemp("reference")
    return run(data_root, results, tamper=error_reply(int(BAD_NODE)), **MOSAIC_2_ROUNDS)[1]


def _faulty_run(data_root: Path, results: Path, mode: str) -> Path:
    client_app = faulty_client_app(mode, BAD_PARTITION)
    return run(data_root, results, client_app=client_app, **MOSAIC_2_ROUNDS)[1]


def _assert_left_out(folder: Path, reference: Path) -> None:
    """Completed, node 3 out of every round, and the model of the run without it."""
    assert sorted(read_json(folder, "metrics.json")["rounds"], key=int) == ["0", "1", "2"]
    for entry in read_json(folder, "participation.json").values():
        assert sorted(entry["replied"]) == GOOD_NODES
    assert_same_state(final_model(folder), final_model(reference))
    assert sorted(read_json(folder, "label_counts.json")) == ["client-0", "client-1"]
    samples = sorted(p.name for p in (folder / "generator_samples").iterdir())
    assert samples == ["client-0.png", "client-1.png"]


def test_every_reply_breaking_fault_names_its_rule() -> None:
    assert set(EXPECTED_RULES) == set(FAULTS) - {"raise", "straggle"}


@pytest.mark.parametrize("mode", sorted(EXPECTED_RULES))
def test_malformed_reply_is_rejected_for_its_rule(data_root, tmp_path, without_bad_node, mode):
    folder = _faulty_run(data_root, tmp_path, mode)

    participation = read_json(folder, "participation.json")
    for server_round, rule in RULES_PER_ROUND[mode].items():
        assert participation[str(server_round)]["rejected"] == {BAD_NODE: rule}
        assert participation[str(server_round)]["failed"] == {}
    _assert_left_out(folder, without_bad_node)


def test_client_crash_mid_round_is_a_failed_reply(data_root, tmp_path, without_bad_node):
    folder = _faulty_run(data_root, tmp_path, "raise")

    for entry in read_json(folder, "participation.json").values():
        assert entry["rejected"] == {}
        assert list(entry["failed"]) == [BAD_NODE]
        assert entry["failed"][BAD_NODE].startswith("InjectedFaultError: ")
    _assert_left_out(folder, without_bad_node)


def test_only_the_named_partition_misbehaves(data_root, tmp_path) -> None:
    grid, _ = run(
        data_root, tmp_path, client_app=faulty_client_app("extra-key", 0), **MOSAIC_2_ROUNDS
    )
    train_replies = [m for m in grid.sent if m.metadata.message_type == "train"]
    broken = {m.metadata.src_node_id for m in train_replies if "debug" in m.content}
    assert broken == {1}  # partition 0 is node 1
