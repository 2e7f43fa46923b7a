"""The ClientApp's train and evaluate functions, called directly on hand-built messages."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_app.app import evaluate_local, train
from common.config import ConfigError, parse_run_config
from common.data import dataset_info, load_client_partition
from common.models import GeneratorSpec, build_classifier, build_generator
from common.train import compute_prototypes
from common.wire import (
    ARRAYS,
    CLIENT,
    GENERATOR,
    LABEL_COUNTS,
    METRICS,
    OPTIONAL_KEYS,
    PROTOTYPES,
    REQUIRED_KEYS,
    record_to_state,
    state_signature,
    state_to_record,
    validate_train_reply,
)
from tests.fakedata import tiny_run_config, write_fake_fashion_mnist

NUM_PARTITIONS = 3
SERVER_NODE_ID = 0


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> dict:
    root = write_fake_fashion_mnist(tmp_path_factory.mktemp("data"))
    return tiny_run_config(root, tmp_path_factory.mktemp("results"))


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages built outside a run need the identity a SuperLink would give the task."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SERVER_NODE_ID


def _model(cfg):
    info = dataset_info(cfg.dataset)
    return build_classifier(
        cfg.model, num_classes=info.num_classes, in_shape=info.image_shape, width=cfg.model_width
    )


def _context(run_config: dict, partition_id: int | None = 0) -> Context:
    node_config = {"num-partitions": NUM_PARTITIONS}
    if partition_id is not None:
        node_config["partition-id"] = partition_id
    return Context(
        run_id=1,
        node_id=partition_id + 1 if partition_id is not None else 99,
        node_config=node_config,
        state=RecordDict(),
        run_config=dict(run_config),
    )


def _train_message(run_config: dict, server_round: int = 1, **round_config) -> Message:
    cfg = parse_run_config(run_config)
    content = RecordDict(
        {
            ARRAYS: state_to_record(_model(cfg).state_dict()),
            "config": ConfigRecord({"server-round": server_round, "lr": cfg.lr, **round_config}),
        }
    )
    return Message(content, dst_node_id=1, message_type="train")


def _validate(run_config: dict, content: RecordDict, *, expect_generator: bool):
    cfg = parse_run_config(run_config)
    info = dataset_info(cfg.dataset)
    model = _model(cfg)
    spec = GeneratorSpec(cfg.gen_latent_dim, info.image_shape, cfg.gen_channels)
    return validate_train_reply(
        content,
        model_signature=state_signature(model.state_dict()),
        num_classes=info.num_classes,
        feature_dim=model.feature_dim,
        protos_per_class=cfg.protos_per_class,
        prototypes_expected=True,
        generator_signature=(
            state_signature(build_generator(spec).state_dict()) if expect_generator else None
        ),
    )


def _local_labels(run_config: dict, partition_id: int) -> np.ndarray:
    return _local_data(run_config, partition_id)[1].numpy()


def _local_data(run_config: dict, partition_id: int):
    cfg = parse_run_config(run_config)
    return load_client_partition(
        cfg.dataset,
        cfg.data_root,
        partition_id,
        NUM_PARTITIONS,
        cfg.partitioning,
        alpha=cfg.alpha,
        classes_per_partition=cfg.classes_per_client,
        min_partition_size=cfg.min_partition_size,
        seed=cfg.seed,
    )


@pytest.fixture(scope="module")
def full_reply(run_config) -> Message:
    """One reply with everything a client may send: prototypes and its generator."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SERVER_NODE_ID
    msg = _train_message(run_config, **{"send-prototypes": True, "train-generator": True})
    return train(msg, _context(run_config, partition_id=1))


# --- train -----------------------------------------------------------------------------------


def test_plain_train_reply_is_valid_and_has_no_extras(run_config) -> None:
    msg = _train_message(run_config, **{"send-prototypes": False, "train-generator": False})
    reply = train(msg, _context(run_config, partition_id=0))

    assert not reply.has_error()
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert set(reply.content.keys()) == REQUIRED_KEYS
    decoded = _validate(run_config, reply.content, expect_generator=False)
    labels = _local_labels(run_config, 0)
    assert decoded.partition_id == 0
    assert decoded.num_examples == len(labels)
    assert decoded.label_counts == np.bincount(labels, minlength=10).tolist()
    assert np.isfinite(decoded.train_loss)


def test_round_config_without_requests_means_no_extras(run_config) -> None:
    reply = train(_train_message(run_config), _context(run_config, partition_id=2))
    assert set(reply.content.keys()) == REQUIRED_KEYS


def test_prototypes_only_when_asked(run_config) -> None:
    msg = _train_message(run_config, **{"send-prototypes": True, "train-generator": False})
    reply = train(msg, _context(run_config, partition_id=1))

    assert set(reply.content.keys()) == REQUIRED_KEYS | {PROTOTYPES}
    decoded = _validate(run_config, reply.content, expect_generator=False)
    held = np.flatnonzero(decoded.label_counts)
    assert set(decoded.prototypes.classes.tolist()) <= set(held.tolist())
    assert len(decoded.prototypes.classes) > 0


@pytest.mark.parametrize("server_round", [1, 2])
def test_prototypes_are_features_of_the_global_model(run_config, server_round) -> None:
    """The centres are features of the model the server sent, not of the locally trained one:
    the experts' heads that score them share the global model's feature space."""
    cfg = parse_run_config(run_config)
    partition_id = 1
    msg = _train_message(run_config, server_round, **{"send-prototypes": True})
    reply = train(msg, _context(run_config, partition_id=partition_id))
    sent = record_to_state(msg.content[ARRAYS])
    trained = record_to_state(reply.content[ARRAYS])
    images, labels = _local_data(run_config, partition_id)

    def centres(state):
        model = _model(cfg)
        model.load_state_dict(state)
        return compute_prototypes(
            model,
            images,
            labels,
            per_class=cfg.protos_per_class,
            min_samples=cfg.min_proto_samples,
            device="cpu",
            seed=cfg.seed + 1000 * partition_id + server_round,
        ).features

    expected, other = sent, trained
    got = reply.content[PROTOTYPES]["features"].numpy()
    np.testing.assert_allclose(got, centres(expected).numpy(), rtol=1e-5, atol=1e-6)
    unexpected = centres(other).numpy()
    assert unexpected.shape != got.shape or not np.allclose(got, unexpected, atol=1e-3)


def test_generator_only_when_asked(run_config) -> None:
    msg = _train_message(run_config, **{"send-prototypes": False, "train-generator": True})
    reply = train(msg, _context(run_config, partition_id=0))

    assert set(reply.content.keys()) == REQUIRED_KEYS | {GENERATOR}
    decoded = _validate(run_config, reply.content, expect_generator=True)
    assert decoded.generator_state is not None


def test_full_reply_passes_validation(run_config, full_reply) -> None:
    decoded = _validate(run_config, full_reply.content, expect_generator=True)
    assert decoded.prototypes is not None
    assert decoded.generator_state is not None


def test_reply_carries_only_the_allowed_records_and_fields(full_reply) -> None:
    content = full_reply.content
    assert set(content.keys()) <= REQUIRED_KEYS | OPTIONAL_KEYS
    assert set(content.keys()) == REQUIRED_KEYS | OPTIONAL_KEYS  # everything was asked for
    assert set(content[METRICS].keys()) == {"num-examples", "train-loss"}
    assert set(content[CLIENT].keys()) == {"partition-id", "width"}
    assert set(content[LABEL_COUNTS].keys()) == {"counts"}
    assert set(content[PROTOTYPES].keys()) == {"features", "classes"}
    assert all(isinstance(content[key], ArrayRecord) for key in (ARRAYS, PROTOTYPES, GENERATOR))
    assert all(isinstance(content[key], MetricRecord) for key in (METRICS, LABEL_COUNTS))
    assert isinstance(content[CLIENT], ConfigRecord)


def test_privacy_audit_no_array_is_per_sample(run_config, full_reply) -> None:
    """No array may have one row per local sample (raw images, labels, per-sample features)."""
    num_local = len(_local_labels(run_config, 1))
    content = full_reply.content
    for name in (ARRAYS, PROTOTYPES, GENERATOR):
        for key, array in content[name].items():
            shape = tuple(array.shape)
            assert not shape or shape[0] != num_local, f"{name}/{key} has shape {shape}"
    # Prototypes are at most k per held class: far fewer rows than samples.
    cfg = parse_run_config(run_config)
    held = sum(1 for c in content[LABEL_COUNTS]["counts"] if c > 0)
    assert content[PROTOTYPES]["classes"].shape[0] <= cfg.protos_per_class * held


def test_prototype_classes_hold_enough_samples(run_config, full_reply) -> None:
    cfg = parse_run_config(run_config)
    counts = full_reply.content[LABEL_COUNTS]["counts"]
    classes = full_reply.content[PROTOTYPES]["classes"].numpy()
    for cls in set(classes.tolist()):
        assert counts[cls] >= cfg.min_proto_samples * int((classes == cls).sum())


def test_train_is_reproducible(run_config) -> None:
    msg = _train_message(run_config)
    first = train(msg, _context(run_config, partition_id=2))
    again = train(msg, _context(run_config, partition_id=2))
    for key, array in first.content[ARRAYS].items():
        np.testing.assert_array_equal(array.numpy(), again.content[ARRAYS][key].numpy())


def test_missing_partition_id_is_a_clear_error(run_config) -> None:
    with pytest.raises(ValueError, match=r"partition-id.*--node-config"):
        train(_train_message(run_config), _context(run_config, partition_id=None))


def test_invalid_run_config_fails_before_training(run_config) -> None:
    bad = {**run_config, "local-steps": 0}
    with pytest.raises(ConfigError, match="local-steps"):
        train(_train_message(run_config), _context(bad, partition_id=0))


# --- evaluate --------------------------------------------------------------------------------


def test_evaluate_scores_the_nodes_test_shard(run_config) -> None:
    cfg = parse_run_config(run_config)
    content = RecordDict(
        {ARRAYS: state_to_record(_model(cfg).state_dict()), "config": ConfigRecord({})}
    )
    msg = Message(content, dst_node_id=1, message_type="evaluate")

    shards = [evaluate_local(msg, _context(run_config, pid)) for pid in range(NUM_PARTITIONS)]

    sizes = []
    for reply in shards:
        assert set(reply.content.keys()) == {"metrics"}
        metrics = reply.content["metrics"]
        assert set(metrics.keys()) == {"num-examples", "accuracy", "loss"}
        assert 0.0 <= metrics["accuracy"] <= 1.0
        sizes.append(metrics["num-examples"])
    assert sum(sizes) == 200  # the IID shards cover the whole fake test split


def test_evaluate_without_partition_id_is_a_clear_error(run_config) -> None:
    cfg = parse_run_config(run_config)
    content = RecordDict({ARRAYS: state_to_record(_model(cfg).state_dict())})
    msg = Message(content, dst_node_id=1, message_type="evaluate")
    with pytest.raises(ValueError, match="partition-id"):
        evaluate_local(msg, _context(run_config, partition_id=None))
