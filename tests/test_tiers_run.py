"""Whole in-process runs with width tiers: clients of three widths, one global model."""

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message

from common.models import build_classifier
from common.tiers import assign_widths, parse_width_tiers
from common.wire import ARRAYS, CLIENT, state_to_record
from server_app.checkpoint import load_checkpoint
from tests.fakedata import tiny_run_config, write_fake_fashion_mnist
from tests.runs import NUM_NODES, assert_same_state, error_reply, final_model, read_json, run

pytestmark = pytest.mark.integration  # whole runs of the app in this process

TIERS = "1:1,0.5:1,0.25:1"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data"))


def _widths(data_root: Path, tmp_path: Path) -> dict[int, float]:
    """Node id -> its width under the rule (node n answers for partition n - 1)."""
    seed = tiny_run_config(data_root, tmp_path)["seed"]
    widths = assign_widths(parse_width_tiers(TIERS), NUM_NODES, seed)
    return {partition + 1: width for partition, width in enumerate(widths)}


@pytest.fixture(scope="module")
def mosaic_tiers_run(data_root, tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("tiers")
    _, folder = run(
        data_root,
        results,
        strategy="mosaic",
        width_tiers=TIERS,
        model_width=0.5,
        kd_sub_models=True,
    )
    return folder


def test_mixed_tier_mosaic_run_accepts_every_reply_and_distills(mosaic_tiers_run) -> None:
    participation = read_json(mosaic_tiers_run, "participation.json")
    assert all(
        not entry["rejected"] and len(entry["replied"]) == 3 for entry in participation.values()
    )
    metrics = read_json(mosaic_tiers_run, "metrics.json")["rounds"]
    assert "post-kd-accuracy" in metrics["2"] and "meta-val-accuracy" in metrics["2"]
    assert {"pre-kd-width-0.25-accuracy", "post-kd-width-0.25-accuracy"} <= metrics["2"].keys()
    for server_round in ("0", "3"):
        assert {"width-0.5-accuracy", "width-0.25-accuracy"} <= metrics[server_round].keys()
    # the global model is the full one
    assert final_model(mosaic_tiers_run)["body.0.weight"].shape[0] == 16  # 32 x model-width


def test_a_node_is_sent_only_its_slice_once_its_width_is_known(
    mosaic_tiers_run, data_root, tmp_path
) -> None:
    widths = _widths(data_root, tmp_path)
    traffic = {
        r: e["traffic"] for r, e in read_json(mosaic_tiers_run, "participation.json").items()
    }
    full = next(node for node, width in widths.items() if width == 1.0)
    for node, width in widths.items():
        first, later = (traffic[r][str(node)]["downlink"]["arrays"] for r in ("1", "2"))
        assert first == traffic["1"][str(full)]["downlink"]["arrays"]  # round 1: the full model
        if width < 1.0:
            assert later < first * width  # a width-r slice holds about r^2 of the weights
    # generators come sized by tier: the smallest uploads the smallest
    generator = {n: traffic["2"][str(n)]["uplink"]["generator"] for n in widths}
    assert sorted(generator, key=generator.get) == sorted(widths, key=widths.get)


@pytest.mark.parametrize("scheme", ["static", "rolling"])
def test_fedavg_across_tiers_completes_with_both_schemes(data_root, tmp_path, scheme) -> None:
    _, folder = run(data_root, tmp_path, strategy="fedavg", width_tiers=TIERS, width_scheme=scheme)
    rounds = read_json(folder, "metrics.json")["rounds"]
    assert rounds["3"]["replied"] == 3 and rounds["3"]["rejected"] == 0
    assert rounds["3"]["accuracy"] > rounds["0"]["accuracy"]


def _declare(node: int, width: float):
    """A tamper: ``node`` declares ``width`` whatever it trained."""

    def tamper(node_id: int, reply: Message) -> Message:
        if node_id == node and not reply.has_error() and CLIENT in reply.content:
            partition = reply.content[CLIENT]["partition-id"]
            reply.content[CLIENT] = ConfigRecord({"partition-id": partition, "width": width})
        return reply

    return tamper


def test_a_client_lying_about_its_width_is_rejected_by_rule(data_root, tmp_path) -> None:
    widths = _widths(data_root, tmp_path)
    small = next(node for node, width in widths.items() if width == 0.25)
    _, folder = run(
        data_root,
        tmp_path,
        tamper=_declare(small, 0.5),
        strategy="fedavg",
        width_tiers=TIERS,
        num_rounds=1,
    )
    assert read_json(folder, "participation.json")["1"]["rejected"] == {
        str(small): "width-declaration"
    }


def test_exclusive_fedavg_averages_the_full_width_clients_only(data_root, tmp_path) -> None:
    widths = _widths(data_root, tmp_path)
    small = {node for node, width in widths.items() if width < 1.0}
    common = {"width_tiers": TIERS, "num_rounds": 1}
    _, exclusive = run(data_root, tmp_path / "exclusive", strategy="fedavg-exclusive", **common)
    _, dropped = run(
        data_root,
        tmp_path / "dropped",
        tamper=lambda node, reply: error_reply(node)(node, reply) if node in small else reply,
        strategy="fedavg",
        **common,
    )
    assert_same_state(final_model(exclusive), final_model(dropped))


def test_a_client_that_changes_its_width_is_refused(data_root, tmp_path) -> None:
    widths = _widths(data_root, tmp_path)
    small = next(node for node, width in widths.items() if width == 0.25)
    config = tiny_run_config(data_root, tmp_path)
    full = build_classifier(
        "cnn", num_classes=10, in_shape=(1, 28, 28), width=config["model-width"]
    ).state_dict()
    replies = {"count": 0}

    def grow(node_id: int, reply: Message) -> Message:
        """From its second reply on, the quarter-width node sends a full model, declared."""
        if node_id == small and not reply.has_error() and CLIENT in reply.content:
            replies["count"] += 1
            if replies["count"] > 1:
                reply.content[ARRAYS] = state_to_record(full)
                _declare(small, 1.0)(node_id, reply)
        return reply

    _, folder = run(
        data_root, tmp_path, tamper=grow, strategy="fedavg", width_tiers=TIERS, num_rounds=2
    )
    participation = read_json(folder, "participation.json")
    assert participation["1"]["rejected"] == {}
    assert participation["2"]["rejected"] == {str(small): "width-changed"}


def test_reading_the_global_features_keeps_only_full_width_prototypes(data_root, tmp_path) -> None:
    _, folder = run(
        data_root, tmp_path, strategy="mosaic", width_tiers=TIERS, meta_features="global"
    )
    bank = load_checkpoint(folder)["strategy"]["prototype-bank"]
    assert [len(entries) for entries in bank.values()] == [1]  # round 2: the one full client
    _, everyone = run(data_root, tmp_path / "experts", strategy="mosaic", width_tiers=TIERS)
    bank = load_checkpoint(everyone)["strategy"]["prototype-bank"]
    assert sum(len(entries) for entries in bank.values()) > 1
