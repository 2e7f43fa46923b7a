"""Privacy audit: everything a client sends in a Mosaic run, checked against what may leave it.

Allowed (client_app/app.py): model weights of the global model's shapes, the sample count and
mean loss, the partition id, one count per class, k-means prototypes (at most ``k`` per class,
each summarising at least ``min-proto-samples`` samples) when asked, the generator's weights
once, and evaluation metrics. Anything else fails the audit, as does any array with a leading
dimension equal to the client's number of samples (per-sample data) and any image-shaped array
outside the generator weights.
"""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import RunConfig, parse_run_config
from common.data import dataset_info, load_client_partition, load_dataset, partition_indices
from common.models import GeneratorSpec, build_classifier, build_generator
from common.wire import (
    ARRAYS,
    CLIENT,
    GENERATOR,
    LABEL_COUNTS,
    METRICS,
    PROTOTYPES,
    state_signature,
)
from server_app.inprocess import run_inprocess
from tests.fakedata import tiny_run_config, write_fake_fashion_mnist
from tests.runs import NUM_NODES

pytestmark = pytest.mark.integration  # whole runs of the app in this process

TRAIN_RECORDS = {
    ARRAYS: ArrayRecord,
    METRICS: MetricRecord,
    CLIENT: ConfigRecord,
    LABEL_COUNTS: MetricRecord,
    PROTOTYPES: ArrayRecord,
    GENERATOR: ArrayRecord,
}
RECORD_KEYS = {
    METRICS: {"num-examples", "train-loss"},
    CLIENT: {"partition-id", "width"},
    LABEL_COUNTS: {"counts"},
    PROTOTYPES: {"features", "classes"},
}
EVALUATE_METRICS = {"num-examples", "accuracy", "loss"}


class Auditor:
    """What one run's clients may send, and the checks every message must pass."""

    def __init__(self, cfg: RunConfig, num_partitions: int) -> None:
        self.cfg = cfg
        self.info = dataset_info(cfg.dataset)
        model = build_classifier(
            cfg.model,
            num_classes=self.info.num_classes,
            in_shape=self.info.image_shape,
            width=cfg.model_width,
        )
        spec = GeneratorSpec(cfg.gen_latent_dim, self.info.image_shape, cfg.gen_channels)
        self.model_signature = state_signature(model.state_dict())
        self.generator_signature = state_signature(build_generator(spec).state_dict())
        self.feature_dim = model.feature_dim
        _, test_labels = load_dataset(cfg.dataset, cfg.data_root, train=False)
        shards = partition_indices(test_labels.numpy(), num_partitions, "iid", seed=cfg.seed)
        # Per partition, the sizes of its data: its train partition and its evaluation shard.
        self.sample_counts = {
            pid: {len(self._train_labels(pid, num_partitions)), len(shards[pid])}
            for pid in range(num_partitions)
        }

    def _train_labels(self, partition_id: int, num_partitions: int):
        cfg = self.cfg
        _, labels = load_client_partition(
            cfg.dataset,
            cfg.data_root,
            partition_id,
            num_partitions,
            cfg.partitioning,
            alpha=cfg.alpha,
            classes_per_partition=cfg.classes_per_client,
            min_partition_size=cfg.min_partition_size,
            seed=cfg.seed,
        )
        return labels

    def _image_shaped(self, shape: tuple[int, ...], *, flattened: bool) -> bool:
        """Trailing dims ``(H, W)``; with ``flattened``, also a last dim of ``C * H * W``."""
        channels, height, width = self.info.image_shape
        return shape[-2:] == (height, width) or (
            flattened and len(shape) >= 1 and shape[-1] == channels * height * width
        )

    def _check_arrays(self, name: str, record: ArrayRecord, partition_id: int) -> list[str]:
        problems = []
        for key, array in record.items():
            shape = tuple(array.shape)
            if shape and shape[0] in self.sample_counts[partition_id]:
                problems.append(f"{name}.{key} {shape}: leading dim is a sample count")
            # The model's first dense layer may take C*H*W inputs (16 x 7 x 7 = 28 x 28 here):
            # its shapes are pinned to the architecture, so only 2-D images count there.
            flattened = name != ARRAYS
            if name != GENERATOR and self._image_shaped(shape, flattened=flattened):
                problems.append(f"{name}.{key} {shape}: image-shaped")
        return problems

    def _check_values(self, name: str, record: MetricRecord | ConfigRecord) -> list[str]:
        problems = []
        for key, value in record.items():
            if isinstance(value, bytes | str):
                problems.append(f"{name}.{key}: {type(value).__name__} value")
            if isinstance(value, list) and len(value) > self.info.num_classes:
                problems.append(f"{name}.{key}: a list of {len(value)} values")
        return problems

    def audit(self, message_type: str, content: RecordDict, partition_id: int) -> list[str]:
        """Every way ``content`` (sent by ``partition_id``) breaks the rules; [] if none."""
        if message_type == "evaluate":
            if set(content) != {"metrics"} or not isinstance(content["metrics"], MetricRecord):
                return [f"evaluate reply holds {sorted(content)}"]
            if set(content["metrics"]) != EVALUATE_METRICS:
                return [f"evaluate metrics {sorted(content['metrics'])}"]
            return self._check_values("metrics", content["metrics"])
        if message_type != "train":
            return [f"a {message_type!r} message"]
        problems = []
        for name, record in content.items():
            if not isinstance(record, TRAIN_RECORDS.get(name, ())):
                problems.append(f"record {name!r} ({type(record).__name__}) is not allowed")
                continue
            if name in RECORD_KEYS and set(record) != RECORD_KEYS[name]:
                problems.append(f"{name} holds {sorted(record)}")
            if isinstance(record, ArrayRecord):
                problems += self._check_arrays(name, record, partition_id)
            else:
                problems += self._check_values(name, record)
        for name, signature in (
            (ARRAYS, self.model_signature),
            (GENERATOR, self.generator_signature),
        ):
            if (
                name in content
                and state_signature(content[name].to_torch_state_dict()) != signature
            ):
                problems.append(f"{name} differs from the expected model")
        if PROTOTYPES in content and not problems:
            problems += self._check_prototypes(content)
        return problems

    def _check_prototypes(self, content: RecordDict) -> list[str]:
        features = content[PROTOTYPES]["features"].numpy()
        classes = content[PROTOTYPES]["classes"].numpy()
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            return [f"prototype features {features.shape}"]
        counts = np.array(content[LABEL_COUNTS]["counts"])
        per_class = np.bincount(classes, minlength=len(counts))
        # Each centre summarises >= min-proto-samples samples, at most k centres per class.
        most = np.minimum(self.cfg.protos_per_class, counts // self.cfg.min_proto_samples)
        if (per_class > most).any():
            return [f"prototypes per class {per_class.tolist()}, at most {most.tolist()}"]
        return []


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory) -> tuple[Auditor, list[Message]]:
    """A Mosaic run with client-side evaluation on: prototypes, generators, metrics all sent."""
    root = write_fake_fashion_mnist(tmp_path_factory.mktemp("data"))
    config = tiny_run_config(root, tmp_path_factory.mktemp("results"), fraction_evaluate=1.0)
    grid = run_inprocess(config, NUM_NODES)
    return Auditor(parse_run_config(config), NUM_NODES), grid.sent


def _partition(message: Message) -> int:
    return message.metadata.src_node_id - 1  # in-process node i holds partition i - 1


def test_the_run_sent_every_kind_of_record(audited_run) -> None:
    _, sent = audited_run
    kinds = {(m.metadata.message_type, name) for m in sent for name in m.content}
    assert {("train", name) for name in TRAIN_RECORDS} | {("evaluate", "metrics")} == kinds
    assert not any(m.has_error() for m in sent)


def test_every_message_a_client_sent_passes_the_audit(audited_run) -> None:
    auditor, sent = audited_run
    for message in sent:
        problems = auditor.audit(
            message.metadata.message_type, message.content, _partition(message)
        )
        assert problems == [], (message.metadata.src_node_id, message.metadata.message_type)


def _train_reply_with(audited_run, name: str) -> tuple[Auditor, RecordDict, int]:
    """A copy of a train reply that carries ``name``, to plant a leak in."""
    auditor, sent = audited_run
    message = next(m for m in sent if m.metadata.message_type == "train" and name in m.content)
    return auditor, RecordDict(dict(message.content.items())), _partition(message)


def test_audit_catches_raw_images(audited_run) -> None:
    auditor, content, partition_id = _train_reply_with(audited_run, ARRAYS)
    content["debug"] = ArrayRecord({"x": Array(np.zeros((4, 1, 28, 28), np.float32))})
    assert auditor.audit("train", content, partition_id)


def test_audit_catches_per_sample_values(audited_run) -> None:
    auditor, content, partition_id = _train_reply_with(audited_run, ARRAYS)
    n_samples = int(content[METRICS]["num-examples"])
    content[METRICS] = MetricRecord(
        {"num-examples": n_samples, "train-loss": 0.1, "losses": [0.1] * n_samples}
    )
    assert auditor.audit("train", content, partition_id)


def test_audit_catches_features_of_every_sample(audited_run) -> None:
    auditor, content, partition_id = _train_reply_with(audited_run, PROTOTYPES)
    n_samples = int(content[METRICS]["num-examples"])
    content[PROTOTYPES] = ArrayRecord(
        {
            "features": Array(np.zeros((n_samples, auditor.feature_dim), np.float32)),
            "classes": Array(np.zeros(n_samples, np.int64)),
        }
    )
    problems = auditor.audit("train", content, partition_id)
    assert any("leading dim is a sample count" in p for p in problems)


def test_audit_catches_images_hidden_in_the_model_record(audited_run) -> None:
    auditor, content, partition_id = _train_reply_with(audited_run, ARRAYS)
    arrays = ArrayRecord(dict(content[ARRAYS].items()))
    arrays["stolen"] = Array(np.zeros((1, 28, 28), np.float32))
    content[ARRAYS] = arrays
    assert auditor.audit("train", content, partition_id)
