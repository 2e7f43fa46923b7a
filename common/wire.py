"""The wire: what the server sends each round, what a client replies, and their encoding.

This is the only module under ``common/`` that imports Flower: both apps need the same
encoding, and keeping encode and validate side by side keeps them in step. Down:
:class:`RoundInstructions` (the round's learning rate, FedProx's term, whether to send
prototypes or train the generator), written by the strategy and read by the client. Up: a train
reply, validated and decoded once by :func:`validate_train_reply` into a :class:`TrainReply`
(weights included); a reply that breaks a rule raises :class:`MalformedReplyError` naming the
rule, and the strategy drops that reply, logs it, and counts it. Nothing is ever unpickled:
tensors travel as Flower ``Array``s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.train import Prototypes

# Record names of a train reply. FedAvg itself only ever sees ARRAYS and METRICS.
ARRAYS, METRICS, CLIENT, LABEL_COUNTS, PROTOTYPES, GENERATOR = (
    "arrays",
    "metrics",
    "client",
    "label-counts",
    "prototypes",
    "generator",
)
REQUIRED_KEYS = frozenset({ARRAYS, METRICS, CLIENT, LABEL_COUNTS})
OPTIONAL_KEYS = frozenset({PROTOTYPES, GENERATOR})
MAX_SAMPLES_PER_CLIENT = 10_000_000  # far above any partition; catches absurd counts
Signature = Mapping[str, tuple[tuple[int, ...], str]]  # key -> (shape, dtype)


@dataclass(frozen=True)
class TierShapes:
    """What the uploads of a client training a sub-model (a width slice, or one architecture of
    a mixed federation) must look like."""

    model: Signature
    feature_dim: int  # its prototypes' width
    generator: Signature | None  # its generator's, for strategies that ask for one


@dataclass(frozen=True)
class Uploads:
    """What a strategy's clients send besides weights and label counts (declared per class)."""

    generator: bool = False  # their generator, once, in the generator round
    prototypes: bool = False  # k-means centres of their features, in the prototype rounds


@dataclass(frozen=True)
class RoundInstructions:
    """What the server tells every client of a round, on top of the global weights.

    Travels as the ``config`` ConfigRecord of the train message (Flower's FedAvg puts
    ``server-round`` there itself). Strategies that ask the same send the same message, so the
    benchmarks' reply cache shares client work between them.
    """

    lr: float
    proximal_mu: float = 0.0  # FedProx's term, as Flower's FedProx sends it
    send_prototypes: bool = False
    train_generator: bool = False

    def to_config(self) -> dict[str, Any]:
        """The ConfigRecord entries (kebab-case keys); ``proximal-mu`` only when it is set."""
        config: dict[str, Any] = {
            "lr": float(self.lr),
            "send-prototypes": self.send_prototypes,
            "train-generator": self.train_generator,
        }
        if self.proximal_mu:
            config["proximal-mu"] = float(self.proximal_mu)
        return config

    @classmethod
    def from_config(cls, config: ConfigRecord) -> RoundInstructions:
        """Read what :meth:`to_config` wrote."""
        return cls(
            lr=float(config["lr"]),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            send_prototypes=bool(config.get("send-prototypes", False)),
            train_generator=bool(config.get("train-generator", False)),
        )


class MalformedReplyError(ValueError):
    """A client reply that must not be aggregated; ``rule`` says which check it failed."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"{rule}: {detail}")
        self.rule = rule


@dataclass
class TrainReply:
    """A validated train reply, decoded into tensors (the weights too: decoded once, here)."""

    state: dict[str, torch.Tensor]
    partition_id: int
    width: float  # the capacity rate the client declares it trained at (1.0: the full model)
    num_examples: int
    train_loss: float
    label_counts: list[int]
    prototypes: Prototypes | None
    generator_state: dict[str, torch.Tensor] | None
    arch: str | None = None  # the architecture it declares, in a federation of several

    @property
    def sub_model(self) -> float | str:
        """What the client trained: its architecture's name in a federation of several, else
        its width."""
        return self.arch if self.arch is not None else self.width


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as an ArrayRecord (detached, contiguous, on CPU; order kept)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord back into a torch state dict (no pickle involved)."""
    return dict(record.to_torch_state_dict())


def pack_train_reply(
    state: Mapping[str, torch.Tensor],
    *,
    num_examples: int,
    train_loss: float,
    partition_id: int,
    label_counts: list[int],
    prototypes: Prototypes | None = None,
    generator_state: Mapping[str, torch.Tensor] | None = None,
    width: float = 1.0,
    arch: str | None = None,
) -> RecordDict:
    """Everything a client may send after training: weights, counts, prototypes, generator,
    the width it trained at (``common.submodels``) and, in a federation of several
    architectures, its own (``common.architectures``)."""
    client = {"partition-id": int(partition_id), "width": float(width)}
    if arch is not None:
        client["arch"] = str(arch)
    content = RecordDict(
        {
            ARRAYS: state_to_record(state),
            METRICS: MetricRecord(
                {"num-examples": int(num_examples), "train-loss": float(train_loss)}
            ),
            CLIENT: ConfigRecord(client),
            LABEL_COUNTS: MetricRecord({"counts": [int(c) for c in label_counts]}),
        }
    )
    if prototypes is not None and len(prototypes.classes):
        content[PROTOTYPES] = ArrayRecord(
            {
                "features": Array(prototypes.features.numpy().astype(np.float32)),
                "classes": Array(prototypes.classes.numpy().astype(np.int64)),
            }
        )
    if generator_state is not None:
        content[GENERATOR] = state_to_record(generator_state)
    return content


def _check_state(
    name: str, record: ArrayRecord, reference: Mapping[str, tuple[tuple[int, ...], str]]
) -> dict[str, torch.Tensor]:
    if not isinstance(record, ArrayRecord):
        raise MalformedReplyError("record-types", f"{name} is a {type(record).__name__}")
    if set(record.keys()) != set(reference):
        missing, extra = set(reference) - set(record.keys()), set(record.keys()) - set(reference)
        raise MalformedReplyError(
            f"{name}-keys", f"missing {brief(sorted(missing))}, unexpected {brief(sorted(extra))}"
        )
    for key, array in record.items():  # check before converting: torch rejects odd dtypes
        shape, dtype = reference[key]
        if tuple(array.shape) != shape or array.dtype != dtype.removeprefix("torch."):
            raise MalformedReplyError(
                f"{name}-shape",
                f"{key} is {tuple(array.shape)} {array.dtype}, expected {shape} {dtype}",
            )
    state = record_to_state(record)
    for key, tensor in state.items():
        shape, dtype = reference[key]
        if tuple(tensor.shape) != shape or str(tensor.dtype) != dtype:
            raise MalformedReplyError(
                f"{name}-shape",
                f"{key} is {tuple(tensor.shape)} {tensor.dtype}, expected {shape} {dtype}",
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise MalformedReplyError(f"{name}-finite", f"{key} holds NaN or Inf")
        _check_batchnorm_buffer(name, key, tensor)
    return state


def _check_batchnorm_buffer(name: str, key: str, tensor: torch.Tensor) -> None:
    """BatchNorm statistics a model can have: variances and counters never negative.

    A finite but negative running variance passes every shape and finiteness check, and turns
    the averaged model's outputs into NaN (the square root of a negative number).
    """
    if key.endswith(("running_var", "num_batches_tracked")) and (tensor < 0).any():
        raise MalformedReplyError(f"{name}-batchnorm", f"{key} holds a negative value")


def brief(value: object, limit: int = 40) -> str:
    """``repr(value)`` cut to about ``limit`` characters, never built whole: the values a reply
    carries are an attacker's, and a 512 MiB string or a 10^7-long list copied into an error
    message would cost the server more than the reply itself. Records hold scalars, strings,
    bytes and lists of them (Flower's ``ConfigRecord`` / ``MetricRecord`` value types)."""
    if isinstance(value, (str, bytes)):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} long)"
    if isinstance(value, list):
        items = ", ".join(brief(item, limit) for item in value[:4])
        return f"[{items}, ... ({len(value)} items)]" if len(value) > 4 else f"[{items}]"
    return repr(value)[:limit]  # ints, floats, bools, None: already short


def _is_int(value: object) -> bool:
    """An int that is not a bool (``True`` would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def state_signature(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype per key: what a reply's arrays are checked against."""
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in state.items()}


EVALUATE_METRICS = frozenset({"num-examples", "accuracy", "loss"})


def validate_evaluate_reply(content: RecordDict) -> None:
    """Check an evaluate reply: one MetricRecord ``metrics`` with a sane ``num-examples``, an
    ``accuracy`` in [0, 1] and a finite non-negative ``loss``; raise on the first broken rule.

    FedAvg weights client metrics by ``num-examples``: one NaN or a huge count would decide the
    round's reported accuracy, and a reply with other keys would end the run.
    """
    if set(content.keys()) != {METRICS} or not isinstance(content[METRICS], MetricRecord):
        raise MalformedReplyError("record-keys", f"expected one MetricRecord {METRICS!r}")
    metrics = content[METRICS]
    if set(metrics.keys()) != EVALUATE_METRICS:
        raise MalformedReplyError("metrics-keys", f"got {brief(sorted(metrics.keys()))}")
    num_examples = metrics["num-examples"]
    if not _is_int(num_examples) or not 0 < num_examples <= MAX_SAMPLES_PER_CLIENT:
        raise MalformedReplyError(
            "num-examples", f"{brief(num_examples)} is not a sane sample count"
        )
    accuracy, loss = metrics["accuracy"], metrics["loss"]
    if not isinstance(accuracy, float) or not 0.0 <= accuracy <= 1.0:
        raise MalformedReplyError("accuracy", f"{brief(accuracy)} is not a float in [0, 1]")
    if not isinstance(loss, float) or not (np.isfinite(loss) and loss >= 0.0):
        raise MalformedReplyError("loss", f"{brief(loss)} is not a finite non-negative float")


def validate_train_reply(
    content: RecordDict,
    *,
    model_signature: Mapping[str, tuple[tuple[int, ...], str]],
    num_classes: int,
    feature_dim: int,
    protos_per_class: int,
    prototypes_expected: bool,
    generator_signature: Mapping[str, tuple[tuple[int, ...], str]] | None,
    sub_models: Mapping[float | str, TierShapes] | None = None,
) -> TrainReply:
    """Check every rule a train reply must satisfy and decode it; raise on the first broken one.

    ``prototypes_expected`` is False in rounds where the server did not ask for prototypes, and
    ``generator_signature`` is None when no generator is expected this round: either block
    arriving anyway is rejected. The signatures are those of the full model; ``sub_models``
    gives the shapes of each other width a client may declare (``width`` in its ``client``
    record; none declared is the full model). Weights that do not fit the declared width break
    ``width-declaration``. In a federation of several architectures ``sub_models`` is keyed by
    architecture name, every reply must declare its ``arch``, and weights that do not fit it
    break ``arch-declaration``.
    """
    _check_records(content)
    partition_id, width, arch = _check_client(content[CLIENT], sub_models or {})
    declared = arch if arch is not None else width
    if declared != 1.0:
        shapes = (sub_models or {})[declared]
        model_signature, feature_dim = shapes.model, shapes.feature_dim
        if generator_signature is not None:
            generator_signature = shapes.generator
    try:
        state = _check_state("weights", content[ARRAYS], model_signature)
    except MalformedReplyError as error:
        if sub_models and error.rule in {"weights-keys", "weights-shape"}:
            rule, what = ("arch-declaration", arch) if arch else ("width-declaration", f"{width:g}")
            raise MalformedReplyError(rule, f"declared {what}; {error}") from None
        raise
    num_examples, train_loss = _check_metrics(content[METRICS])
    counts = _check_label_counts(content[LABEL_COUNTS], num_classes, num_examples)

    prototypes = None
    if PROTOTYPES in content:
        if not prototypes_expected:
            raise MalformedReplyError("prototypes-unexpected", "no prototypes were asked for")
        max_rows = protos_per_class * num_classes
        prototypes = _decode_prototypes(content[PROTOTYPES], num_classes, feature_dim, max_rows)
        _check_prototype_classes(prototypes, counts, protos_per_class)

    generator_state = None
    if GENERATOR in content:
        if generator_signature is None:
            raise MalformedReplyError("generator-unexpected", "no generator was asked for")
        generator_state = _check_state("generator", content[GENERATOR], generator_signature)
    return TrainReply(
        state=state,
        partition_id=partition_id,
        width=width,
        num_examples=num_examples,
        train_loss=train_loss,
        label_counts=counts,
        prototypes=prototypes,
        generator_state=generator_state,
        arch=arch,
    )


RECORD_TYPES = {
    ARRAYS: ArrayRecord,
    METRICS: MetricRecord,
    CLIENT: ConfigRecord,
    LABEL_COUNTS: MetricRecord,
    PROTOTYPES: ArrayRecord,
    GENERATOR: ArrayRecord,
}


def _check_records(content: RecordDict) -> None:
    """The required records, no unknown ones, each of its type."""
    keys = set(content.keys())
    if not keys >= REQUIRED_KEYS or keys - REQUIRED_KEYS - OPTIONAL_KEYS:
        raise MalformedReplyError(
            "record-keys",
            f"missing {sorted(REQUIRED_KEYS - keys)}, "
            f"unexpected {brief(sorted(keys - REQUIRED_KEYS - OPTIONAL_KEYS))}",
        )
    for key in keys:
        if not isinstance(content[key], RECORD_TYPES[key]):
            raise MalformedReplyError("record-types", f"{key} is a {type(content[key]).__name__}")


def _check_client(
    record: ConfigRecord, sub_models: Mapping[float | str, TierShapes]
) -> tuple[int, float, str | None]:
    """``partition-id`` (a non-negative int), ``width`` (1.0 or a rate of ``sub_models``;
    absent means 1.0) and ``arch`` (required exactly when ``sub_models`` names architectures,
    one of them), nothing else."""
    keys = set(record.keys())
    if "partition-id" not in keys or keys - {"partition-id", "width", "arch"}:
        raise MalformedReplyError("client-keys", f"got {brief(sorted(record.keys()))}")
    partition_id = record["partition-id"]
    if not _is_int(partition_id) or partition_id < 0:
        raise MalformedReplyError("partition-id", f"{brief(partition_id)} is not a partition id")
    rates = sorted(key for key in sub_models if isinstance(key, float))
    width = record.get("width", 1.0)
    if not isinstance(width, float) or (width != 1.0 and width not in rates):
        raise MalformedReplyError(
            "width", f"{brief(width)} is not a width of this run ({[1.0, *rates]})"
        )
    names = sorted(key for key in sub_models if isinstance(key, str))
    arch = record.get("arch")
    if names and (arch not in names or width != 1.0):
        raise MalformedReplyError(
            "arch",
            f"{brief(arch)} at width {brief(width)} is not an architecture of this run ({names})",
        )
    if not names and arch is not None:
        raise MalformedReplyError(
            "arch", f"declared {brief(arch)}, but this run has one architecture"
        )
    return partition_id, width, arch


def _check_metrics(metrics: MetricRecord) -> tuple[int, float]:
    """``num-examples`` (a sane count) and ``train-loss`` (finite), nothing else."""
    if set(metrics.keys()) != {"num-examples", "train-loss"}:
        # FedAvg demands identical metric keys across replies: one odd reply would end the run.
        raise MalformedReplyError("metrics-keys", f"got {brief(sorted(metrics.keys()))}")
    num_examples = metrics["num-examples"]
    if not _is_int(num_examples) or not 0 < num_examples <= MAX_SAMPLES_PER_CLIENT:
        raise MalformedReplyError(
            "num-examples", f"{brief(num_examples)} is not a sane sample count"
        )
    train_loss = metrics["train-loss"]
    if not isinstance(train_loss, float) or not np.isfinite(train_loss):
        raise MalformedReplyError("train-loss", f"{brief(train_loss)} is not a finite float")
    return num_examples, float(train_loss)


def _check_label_counts(record: MetricRecord, num_classes: int, num_examples: int) -> list[int]:
    """One non-negative int per class, summing to ``num-examples``."""
    if set(record.keys()) != {"counts"}:
        raise MalformedReplyError("label-counts-keys", f"got {brief(sorted(record.keys()))}")
    counts = record["counts"]
    if (
        not isinstance(counts, list)
        or len(counts) != num_classes
        or not all(_is_int(c) and c >= 0 for c in counts)
    ):
        raise MalformedReplyError(
            "label-counts", f"need {num_classes} non-negative ints, got {brief(counts)}"
        )
    if sum(counts) != num_examples:
        raise MalformedReplyError(
            "label-counts-sum", f"counts sum to {sum(counts)}, num-examples is {num_examples}"
        )
    return list(counts)


def _check_prototype_classes(
    prototypes: Prototypes, counts: list[int], protos_per_class: int
) -> None:
    """At most ``protos-per-class`` centres per class, and only for classes the client holds."""
    per_class = torch.bincount(prototypes.classes, minlength=len(counts))
    if per_class.max() > protos_per_class:
        raise MalformedReplyError(
            "prototypes-per-class",
            f"{per_class.max()} centres for one class, max is {protos_per_class}",
        )
    if (per_class > 0).logical_and(torch.tensor(counts) == 0).any():
        raise MalformedReplyError("prototypes-classes", "a prototype for a class not held")


def _decode_prototypes(
    record: ArrayRecord, num_classes: int, feature_dim: int, max_rows: int
) -> Prototypes:
    """Shapes and dtypes are read off the arrays' headers first: an oversized bank is refused
    before a byte of it is copied or converted."""
    if set(record.keys()) != {"features", "classes"}:
        raise MalformedReplyError("prototypes-keys", f"got {brief(sorted(record.keys()))}")
    features, classes = record["features"], record["classes"]
    if features.dtype != "float32" or len(features.shape) != 2 or features.shape[1] != feature_dim:
        raise MalformedReplyError(
            "prototypes-shape",
            f"features {tuple(features.shape)} {features.dtype}, "
            f"expected [n, {feature_dim}] float32",
        )
    if classes.dtype != "int64" or tuple(classes.shape) != (features.shape[0],):
        raise MalformedReplyError("prototypes-shape", f"classes {tuple(classes.shape)}")
    if features.shape[0] > max_rows:
        raise MalformedReplyError(
            "prototypes-per-class", f"{features.shape[0]} centres, at most {max_rows} in all"
        )
    features = torch.from_numpy(features.numpy().copy())
    classes = torch.from_numpy(classes.numpy().copy())
    if not torch.isfinite(features).all():
        raise MalformedReplyError("prototypes-finite", "features hold NaN or Inf")
    if len(classes) and (classes.min() < 0 or classes.max() >= num_classes):
        raise MalformedReplyError("prototypes-classes", "class id out of range")
    return Prototypes(features, classes)
