"""Misbehaving clients, for tests: turn a correct train reply into one the server must refuse.

:func:`faulty_client_app` wraps the real ClientApp so that one partition misbehaves in every
train round; the product never sees this module. Each mode breaks one rule of
:func:`common.wire.validate_train_reply` (the rule the server must name is in
:data:`EXPECTED_RULES`), raises as a crashing client would, or answers after the round timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from common.config import RunConfig, parse_run_config
from common.data import dataset_info
from common.models import build_classifier
from common.wire import (
    ARRAYS,
    GENERATOR,
    LABEL_COUNTS,
    MAX_SAMPLES_PER_CLIENT,
    METRICS,
    PROTOTYPES,
)

# The rule a server must name when it rejects the reply. Rounds that did not ask for prototypes
# or a generator reject an added block as unexpected instead (see the two modes below).
EXPECTED_RULES = {
    "nan-weights": "weights-finite",
    "wrong-shape": "weights-shape",
    "missing-key": "record-keys",
    "extra-key": "record-keys",
    "negative-counts": "label-counts",
    "huge-counts": "num-examples",
    "oversized-prototypes": "prototypes-per-class",
    "wrong-generator": "generator-shape",
}


class InjectedFaultError(RuntimeError):
    """The exception of the ``raise`` mode: a client that crashes mid-round."""


def _first_float_key(record: ArrayRecord) -> str:
    return next(k for k in record if record[k].dtype.startswith("float"))


def _one_row_more(array: Array) -> Array:
    values = array.numpy()
    return Array(np.concatenate([values, values[:1]]))


def _nan_weights(content: RecordDict, cfg: RunConfig, feature_dim: int) -> RecordDict:
    arrays = content[ARRAYS]
    key = _first_float_key(arrays)
    poisoned = arrays[key].numpy().copy()
    poisoned.reshape(-1)[0] = np.nan
    arrays[key] = Array(poisoned)
    return content


def _wrong_shape(content: RecordDict, cfg: RunConfig, feature_dim: int) -> RecordDict:
    arrays = content[ARRAYS]
    key = _first_float_key(arrays)
    arrays[key] = _one_row_more(arrays[key])
    return content


def _missing_key(content: RecordDict, cfg: RunConfig, feature_dim: int) -> RecordDict:
    del content[LABEL_COUNTS]
    return content


def _extra_key(content: RecordDict, cfg: RunConfig, feature_dim: int) -> RecordDict:
    content["debug"] = MetricRecord({"local-accuracy": 1.0})
    return content


def _negative_counts(content: RecordDict, cfg: RunConfig, feature_dim: int) -> RecordDict:
    """One count of -1, the sum kept, so only the sign rule can catch it."""
    counts = list(content[LABEL_COUNTS]["counts"])
    counts[1] += counts[0] + 1
    counts[0] = -1
    content[LABEL_COUNTS] = MetricRecord({"counts": counts})
    return content


def _huge_counts(content: RecordDict, cfg: RunConfig, feature_dim: int) -> RecordDict:
    """Claim more samples than any client holds, consistently, to dominate the weighted mean."""
    extra = MAX_SAMPLES_PER_CLIENT
    counts = list(content[LABEL_COUNTS]["counts"])
    counts[0] += extra
    content[LABEL_COUNTS] = MetricRecord({"counts": counts})
    content[METRICS]["num-examples"] = int(content[METRICS]["num-examples"]) + extra
    return content


def _oversized_prototypes(content: RecordDict, cfg: RunConfig, feature_dim: int) -> RecordDict:
    """``protos-per-class + 1`` centres of one held class (more than k per class)."""
    counts = content[LABEL_COUNTS]["counts"]
    held = int(np.argmax(counts))
    rows = cfg.protos_per_class + 1
    content[PROTOTYPES] = ArrayRecord(
        {
            "features": Array(np.ones((rows, feature_dim), np.float32)),
            "classes": Array(np.full(rows, held, np.int64)),
        }
    )
    return content


def _wrong_generator(content: RecordDict, cfg: RunConfig, feature_dim: int) -> RecordDict:
    """The generator upload with one array a row too long; one is added if none was asked for."""
    if GENERATOR in content:
        generator = content[GENERATOR]
        key = _first_float_key(generator)
        generator[key] = _one_row_more(generator[key])
    else:
        content[GENERATOR] = ArrayRecord({"fc.weight": Array(np.zeros((1, 1), np.float32))})
    return content


def _raise(content: RecordDict, cfg: RunConfig, feature_dim: int) -> RecordDict:
    raise InjectedFaultError("fault-mode raise: the client crashed mid-round")


def _straggle(content: RecordDict, cfg: RunConfig, feature_dim: int) -> RecordDict:
    """Answer correctly, but one second after the round timeout."""
    time.sleep(cfg.round_timeout + 1.0)
    return content


FAULTS: dict[str, Callable[[RecordDict, RunConfig, int], RecordDict]] = {
    "nan-weights": _nan_weights,
    "wrong-shape": _wrong_shape,
    "missing-key": _missing_key,
    "extra-key": _extra_key,
    "negative-counts": _negative_counts,
    "huge-counts": _huge_counts,
    "oversized-prototypes": _oversized_prototypes,
    "wrong-generator": _wrong_generator,
    "raise": _raise,
    "straggle": _straggle,
}


def faulty_client_app(
    mode: str, partition: int, client_app: Callable[[Message, Context], Message] | None = None
) -> Callable[[Message, Context], Message]:
    """The ClientApp (the project's, or ``client_app``) with partition ``partition`` sending
    train replies broken as ``mode`` says; every other node and message is left alone."""
    if client_app is None:
        from client_app.app import app as client_app
    inject = FAULTS[mode]

    def app(msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        if (
            msg.metadata.message_type != "train"
            or int(context.node_config["partition-id"]) != partition
            or reply.has_error()
        ):
            return reply
        cfg = parse_run_config(context.run_config)
        info = dataset_info(cfg.dataset)
        with torch.random.fork_rng():  # the server shares this process: leave its RNG alone
            model = build_classifier(
                cfg.model,
                num_classes=info.num_classes,
                in_shape=info.image_shape,
                width=cfg.model_width,
            )
        return Message(inject(reply.content, cfg, model.feature_dim), reply_to=msg)

    return app
