"""Bytes on the wire per node and record, and the payload limits checked before the first round."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

import server_app.traffic as traffic
from common.config import (
    parse_run_config,
    pyproject_defaults,
)
from common.data import dataset_info, dataset_names
from common.models import GeneratorSpec, build_classifier, build_generator, classifier_names
from common.wire import state_to_record
from server_app.inprocess import run_inprocess
from server_app.strategies import STRATEGIES, uploads_of
from server_app.traffic import (
    DOWNLINK,
    TOTAL,
    UPLINK,
    PayloadTooLargeError,
    check_message,
    check_payload_limits,
    log_downlink,
    payload_estimates,
    record_bytes,
)
from tests.fakedata import tiny_run_config, write_fake_fashion_mnist
from tests.runs import build_strategy

DEFAULTS = pyproject_defaults(Path(__file__).resolve().parent.parent / "pyproject.toml")


def _cfg(**overrides: object):
    return parse_run_config({**DEFAULTS, **{k.replace("_", "-"): v for k, v in overrides.items()}})


def _content(floats: int = 3000) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.ones(floats, dtype=np.float32))}),
            "config": ConfigRecord({"lr": 0.1, "server-round": 1}),
        }
    )


def test_record_bytes_is_what_flower_pushes() -> None:
    content = _content()
    sizes = record_bytes(content)

    pushed = sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
    assert sizes[TOTAL] == pushed
    assert 12_000 < sizes["arrays"] < 13_000  # 3000 float32 + npy and object headers
    assert sizes["config"] < 200
    assert sizes[TOTAL] > sizes["arrays"] + sizes["config"]  # + the RecordDict's own object


def test_identical_chunks_travel_once() -> None:
    # 20 MiB of zeros after the npy header, in 5 MiB chunks: the first holds the header, the
    # next three are identical (one object, pushed once), the last holds the header's overflow
    zeros = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(5 << 20, np.float32))})})
    assert 10 << 20 < record_bytes(zeros)["arrays"] < (10 << 20) + 2000


def test_an_oversized_instruction_fails_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(traffic, "MESSAGE_BUDGET_BYTES", 10_000)
    grid = _grid_for_messages()
    messages = [grid.create_message(_content(), "train", 1, "")]

    with pytest.raises(PayloadTooLargeError, match=r"train instruction: .* budget .*'arrays'"):
        log_downlink({}, messages)


def test_an_object_over_the_protobuf_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(traffic, "OBJECT_LIMIT_BYTES", 100)
    blob = RecordDict({"config": ConfigRecord({"blob": b"x" * 1000})})

    with pytest.raises(PayloadTooLargeError, match=r"ConfigRecord object .* protobuf limit"):
        check_message(blob, "reply")


def _grid_for_messages():
    """An in-process grid: it sets the task identity Flower needs to build a Message."""
    from client_app.app import app as client_app
    from server_app.inprocess import InProcessGrid

    return InProcessGrid(client_app, 1, DEFAULTS)


def test_estimates_bound_the_real_serialized_sizes_of_the_default_run() -> None:
    cfg = _cfg()
    info = dataset_info(cfg.dataset)
    estimates = payload_estimates(cfg, uploads_of(cfg.strategy))
    model = build_classifier(
        cfg.model, num_classes=info.num_classes, in_shape=info.image_shape, width=cfg.model_width
    )
    spec = GeneratorSpec(cfg.gen_latent_dim, info.image_shape, cfg.gen_channels)
    generator = build_generator(spec)

    weights = record_bytes(RecordDict({"w": state_to_record(model.state_dict())}))["w"]
    gen = record_bytes(RecordDict({"g": state_to_record(generator.state_dict())}))["g"]
    # upper bounds; identical tensors (fresh norm layers) even travel once, hence the slack
    assert weights <= estimates["weights"] <= weights * 1.05
    assert gen <= estimates["generator"] <= gen * 1.05
    assert estimates["uplink"] == sum(estimates[k] for k in ("weights", "generator", "prototypes"))


@pytest.mark.parametrize("dataset", dataset_names())
@pytest.mark.parametrize("model", classifier_names())
def test_the_largest_model_the_config_allows_fits_with_the_default_generator(
    dataset: str, model: str
) -> None:
    widest = 4.0  # common/config.py: model-width <= 4
    cfg = _cfg(dataset=dataset, model=model, model_width=widest)
    estimates = check_payload_limits(cfg, uploads_of(cfg.strategy))

    assert 0 < estimates["uplink"] < traffic.MESSAGE_BUDGET_BYTES


def test_an_oversized_generator_fails_fast_naming_the_keys() -> None:
    with pytest.raises(PayloadTooLargeError, match="gen-channels") as error:
        check_payload_limits(_cfg(gen_channels=4000), uploads_of("mosaic"))
    assert "uplink" in str(error.value) and "budget" in str(error.value)


def test_the_payload_check_leaves_the_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    payload_estimates(
        _cfg(model="resnet18", model_width=4.0, gen_channels=1024), uploads_of("mosaic")
    )
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.integration
def test_a_run_records_bytes_per_node_and_record_every_round(tmp_path: Path) -> None:
    data_root = write_fake_fashion_mnist(tmp_path / "data")
    config = tiny_run_config(data_root, tmp_path / "results")
    run_inprocess(config, 2)

    folder = tmp_path / "results" / config["run-name"]
    participation = json.loads((folder / "participation.json").read_text())
    generator_round = config["generator-round"] or config["kd-round"]
    for server_round, round_log in participation.items():
        server_round = int(server_round)
        assert set(round_log["traffic"]) == {str(node) for node in round_log["sampled"]}
        with_prototypes = server_round in parse_run_config(config).prototype_rounds
        uplinks = [sizes[UPLINK] for sizes in round_log["traffic"].values()]
        for sizes in round_log["traffic"].values():
            down, up = sizes[DOWNLINK], sizes[UPLINK]
            assert set(down) == {"arrays", "config", TOTAL}
            # the same model both ways; identical fresh tensors travel once, trained ones not
            assert 0 < down["arrays"] <= up["arrays"] <= down["arrays"] * 1.05
            assert {"metrics", "client", "label-counts"} <= set(up)
            assert ("generator" in up) == (server_round == generator_round)
            assert with_prototypes or "prototypes" not in up
        assert not with_prototypes or any("prototypes" in up for up in uplinks)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_strategy_asks_clients_for_what_the_payload_check_sizes(name: str) -> None:
    """The pre-run check sizes uploads from each strategy's declared ``uploads``: they must
    match what its round instructions actually ask clients for."""
    cfg = _cfg(strategy=name)
    strategy = build_strategy(cfg)
    instructions = [strategy.instructions(r) for r in range(1, cfg.num_rounds + 1)]
    asks_generator = any(i.train_generator for i in instructions)
    asks_prototypes = any(i.send_prototypes for i in instructions)
    uploads = uploads_of(name)
    estimates = payload_estimates(cfg, uploads)

    assert asks_generator == uploads.generator == ("generator" in estimates)
    assert asks_prototypes == uploads.prototypes == ("prototypes" in estimates)
