"""The benchmarks' reply cache: a reply is shared only where the client would send it again."""

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.supercore.task_identity import TaskIdentity

from benchmarks import Cell, Suite, run_suite
from benchmarks.reply_cache import ReplyCache, client_code_digest, reply_key
from client_app.app import app
from common.config import SERVER_ONLY_KEYS, parse_run_config
from common.data import dataset_info
from common.models import build_classifier
from common.wire import ARRAYS, state_to_record
from tests.fakedata import OTHER_VALUES, TINY_SIZES, tiny_run_config, write_fake_fashion_mnist

pytestmark = pytest.mark.integration  # whole runs of the app in this process


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run_config(data_root, tmp_path_factory) -> dict:
    return tiny_run_config(data_root, tmp_path_factory.mktemp("results"), strategy="mosaic")


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0


def _context(run_config: dict) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config=dict(run_config),
    )


def _message(run_config: dict, **instructions: object) -> Message:
    """Round 1 of a run that asks for everything a client can send (``instructions``: more
    entries of the round's config, e.g. FedProx's ``proximal-mu``)."""
    cfg = parse_run_config(run_config)
    info = dataset_info(cfg.dataset)
    model = build_classifier(
        cfg.model, num_classes=info.num_classes, in_shape=info.image_shape, width=cfg.model_width
    )
    config = {"server-round": 1, "lr": 0.01, "send-prototypes": True, "train-generator": True}
    config.update(instructions)
    content = RecordDict(
        {ARRAYS: state_to_record(model.state_dict()), "config": ConfigRecord(config)}
    )
    return Message(content, dst_node_id=1, message_type="train")


def _reply_bytes(run_config: dict, message: Message) -> bytes:
    reply = app(message, _context(run_config))
    assert not reply.has_error(), reply.error
    return recorddict_to_proto(reply.content).SerializeToString(deterministic=True)


def test_every_server_only_key_has_a_test_value() -> None:
    assert set(OTHER_VALUES) >= SERVER_ONLY_KEYS


def test_the_client_ignores_every_server_only_key(run_config) -> None:
    other = {**run_config, **{key: OTHER_VALUES[key] for key in SERVER_ONLY_KEYS}}
    parse_run_config(other)  # a valid config, not one the client rejects
    message = _message(run_config)
    assert _reply_bytes(run_config, message) == _reply_bytes(other, message)
    code = client_code_digest()
    assert reply_key(message, _context(run_config), code) == reply_key(
        message, _context(other), code
    )


@pytest.mark.parametrize("change", [{"seed": 1}, {"local-steps": 4}], ids=["seed", "local-steps"])
def test_a_key_the_client_reads_changes_the_reply_and_its_key(run_config, change) -> None:
    other = {**run_config, **change}
    message = _message(run_config)
    assert _reply_bytes(run_config, message) != _reply_bytes(other, message)
    code = client_code_digest()
    assert reply_key(message, _context(run_config), code) != reply_key(
        message, _context(other), code
    )


def test_fedprox_term_in_the_message_changes_the_reply_and_its_key(run_config) -> None:
    plain, proximal = _message(run_config), _message(run_config, **{"proximal-mu": 0.5})
    assert _reply_bytes(run_config, plain) != _reply_bytes(run_config, proximal)
    code = client_code_digest()
    context = _context(run_config)
    assert reply_key(plain, context, code) != reply_key(proximal, context, code)


def test_an_edit_to_the_client_code_changes_the_digest(tmp_path) -> None:
    for package in ("client_app", "common"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "a.py").write_text("x = 1\n")
    before = client_code_digest(tmp_path)
    (tmp_path / "common" / "a.py").write_text("x = 2\n")
    assert client_code_digest(tmp_path) != before


# In a one-shot round feddf and mosaic ask the clients the same thing (training and a
# generator), as fedavg and ensemble do (training alone); fedprox's clients train otherwise.
CELLS = [
    Cell("fashion-mnist", 1.0, 3, "one-shot", strategy, 0)
    for strategy in ("feddf", "mosaic", "fedavg", "ensemble", "fedprox")
]
SIZES = {**TINY_SIZES, "local-steps": 3, "local-epochs": 0.0, "min-partition-size": 5}
for key in ("num-rounds", "kd-round", "proto-start-round", "run-name"):
    SIZES.pop(key)


def _suite(cells, out: Path, base: dict, cache: ReplyCache | None) -> dict[str, dict]:
    records = run_suite(
        Suite("test", cells, SIZES), out, base=base, reply_cache=cache, progress=lambda _: None
    )
    return {r["cell"]["strategy"]: r for r in records}


def test_cells_that_ask_the_same_share_replies_and_results(data_root, tmp_path) -> None:
    base = {**tiny_run_config(data_root, tmp_path / "unused"), "proximal-mu": 0.01}
    cached = _suite(CELLS, tmp_path / "cached", base, ReplyCache(tmp_path / "replies"))
    assert cached["feddf"]["client_replies"] == {"reused": 0, "computed": 3}
    assert cached["mosaic"]["client_replies"] == {"reused": 3, "computed": 0}
    assert cached["fedavg"]["client_replies"] == {"reused": 0, "computed": 3}
    assert cached["ensemble"]["client_replies"] == {"reused": 3, "computed": 0}
    assert cached["fedprox"]["client_replies"] == {"reused": 0, "computed": 3}

    alone = _suite(CELLS[1:2], tmp_path / "alone", base, None)
    assert "client_replies" not in alone["mosaic"]
    for field in ("final_accuracy", "teacher_accuracy", "pre_kd_accuracy"):
        assert cached["mosaic"][field] == alone["mosaic"][field]

    forced = ReplyCache(tmp_path / "replies", read=False)
    again = _suite(CELLS[1:2], tmp_path / "forced", base, forced)
    assert again["mosaic"]["client_replies"] == {"reused": 0, "computed": 3}


def test_undistilled_baselines_send_fedavgs_messages_in_every_round(data_root, tmp_path) -> None:
    base = tiny_run_config(data_root, tmp_path / "unused")
    cells = [
        Cell("fashion-mnist", 1.0, 3, "multi-round", strategy, 0)
        for strategy in ("fedavg", "label-share", "mosaic")
    ]
    records = _suite(cells, tmp_path / "multi", base, ReplyCache(tmp_path / "replies"))
    every_reply = 3 * records["fedavg"]["config"]["num-rounds"]
    assert records["label-share"]["client_replies"] == {"reused": every_reply, "computed": 0}
    # Mosaic asks for prototypes from round 3 on: the same messages in rounds 1-2 only
    assert records["mosaic"]["client_replies"] == {"reused": 3 * 2, "computed": every_reply - 6}
