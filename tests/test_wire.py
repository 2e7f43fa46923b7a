"""Train replies: packing round-trips, and every validation rule rejects what it should."""

import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.models import GeneratorSpec, build_classifier, build_generator
from common.train import Prototypes
from common.wire import (
    ARRAYS,
    CLIENT,
    LABEL_COUNTS,
    MAX_SAMPLES_PER_CLIENT,
    METRICS,
    PROTOTYPES,
    MalformedReplyError,
    brief,
    pack_train_reply,
    record_to_state,
    state_signature,
    state_to_record,
    validate_evaluate_reply,
    validate_train_reply,
)

NUM_CLASSES = 4
PROTOS_PER_CLASS = 2
COUNTS = [3, 0, 5, 2]  # class 1 is not held
SPEC = GeneratorSpec(latent_dim=8, image_shape=(1, 8, 8), base_channels=4)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_classifier("cnn", num_classes=NUM_CLASSES, in_shape=(1, 8, 8), width=0.25)


@pytest.fixture(scope="module")
def generator_state() -> dict[str, torch.Tensor]:
    return build_generator(SPEC).state_dict()


def _prototypes(feature_dim: int, classes: list[int]) -> Prototypes:
    return Prototypes(torch.randn(len(classes), feature_dim), torch.tensor(classes))


def _reply(model, generator_state=None, prototypes=None, **overrides) -> RecordDict:
    values = {
        "num_examples": sum(COUNTS),
        "train_loss": 0.5,
        "partition_id": 2,
        "label_counts": COUNTS,
        **overrides,
    }
    return pack_train_reply(
        model.state_dict(), prototypes=prototypes, generator_state=generator_state, **values
    )


def _validate(
    content: RecordDict, model, *, expect_generator: bool = False, expect_prototypes: bool = True
):
    return validate_train_reply(
        content,
        model_signature=state_signature(model.state_dict()),
        num_classes=NUM_CLASSES,
        feature_dim=model.feature_dim,
        protos_per_class=PROTOS_PER_CLASS,
        prototypes_expected=expect_prototypes,
        generator_signature=(
            state_signature(build_generator(SPEC).state_dict()) if expect_generator else None
        ),
    )


def _assert_rejected(content: RecordDict, model, rule: str, **kwargs) -> None:
    with pytest.raises(MalformedReplyError) as caught:
        _validate(content, model, **kwargs)
    assert caught.value.rule == rule
    assert str(caught.value).startswith(f"{rule}: ")


def _with_weights(content: RecordDict, change: Callable[[dict], None]) -> RecordDict:
    state = {k: v.clone() for k, v in record_to_state(content[ARRAYS]).items()}
    change(state)
    content[ARRAYS] = state_to_record(state)
    return content


def _first_float_key(state: dict[str, torch.Tensor]) -> str:
    return next(k for k, v in state.items() if v.is_floating_point())


# --- round trip ------------------------------------------------------------------------------


def test_round_trip_keeps_weights_counts_prototypes_and_generator(model, generator_state) -> None:
    prototypes = _prototypes(model.feature_dim, [0, 0, 2, 3])
    content = _reply(model, generator_state, prototypes)

    reply = _validate(content, model, expect_generator=True)

    assert reply.partition_id == 2
    assert reply.num_examples == sum(COUNTS)
    assert reply.train_loss == pytest.approx(0.5)
    assert reply.label_counts == COUNTS
    assert torch.equal(reply.prototypes.features, prototypes.features)
    assert torch.equal(reply.prototypes.classes, prototypes.classes)
    assert reply.prototypes.features.dtype == torch.float32
    assert reply.prototypes.classes.dtype == torch.int64
    assert reply.generator_state.keys() == generator_state.keys()
    for key, tensor in generator_state.items():
        assert torch.equal(reply.generator_state[key], tensor)
    for key, tensor in model.state_dict().items():
        assert torch.equal(record_to_state(content[ARRAYS])[key], tensor)


def test_minimal_reply_has_only_the_required_records(model) -> None:
    content = _reply(model)
    assert set(content.keys()) == {ARRAYS, METRICS, CLIENT, LABEL_COUNTS}
    reply = _validate(content, model)
    assert reply.prototypes is None
    assert reply.generator_state is None


def test_empty_prototypes_are_not_packed(model) -> None:
    content = _reply(model, prototypes=_prototypes(model.feature_dim, []))
    assert PROTOTYPES not in content


def test_state_to_record_makes_channels_last_tensors_contiguous() -> None:
    weight = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    assert not weight.is_contiguous()
    record = state_to_record({"conv.weight": weight, "bias": torch.arange(4)})

    assert tuple(record["conv.weight"].shape) == (4, 3, 5, 5)
    back = record_to_state(record)
    assert torch.equal(back["conv.weight"], weight)
    assert back["conv.weight"].is_contiguous()
    assert torch.equal(back["bias"], torch.arange(4))
    assert list(back) == ["conv.weight", "bias"]  # order kept


def test_classifier_state_round_trips_through_a_record(model) -> None:
    back = record_to_state(state_to_record(model.state_dict()))
    fresh = build_classifier("cnn", num_classes=NUM_CLASSES, in_shape=(1, 8, 8), width=0.25)
    fresh.load_state_dict(back)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


# --- weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_rejected(model, bad_value) -> None:
    def poison(state: dict) -> None:
        state[_first_float_key(state)].view(-1)[0] = bad_value

    _assert_rejected(_with_weights(_reply(model), poison), model, "weights-finite")


def test_weight_of_wrong_shape_is_rejected(model) -> None:
    def reshape(state: dict) -> None:
        key = _first_float_key(state)
        state[key] = torch.zeros(state[key].numel() + 1)

    _assert_rejected(_with_weights(_reply(model), reshape), model, "weights-shape")


def test_weight_of_wrong_dtype_is_rejected(model) -> None:
    def to_double(state: dict) -> None:
        key = _first_float_key(state)
        state[key] = state[key].double()

    _assert_rejected(_with_weights(_reply(model), to_double), model, "weights-shape")


def test_missing_weight_key_is_rejected(model) -> None:
    def drop(state: dict) -> None:
        del state[_first_float_key(state)]

    _assert_rejected(_with_weights(_reply(model), drop), model, "weights-keys")


def test_extra_weight_key_is_rejected(model) -> None:
    def add(state: dict) -> None:
        state["smuggled"] = torch.zeros(3)

    _assert_rejected(_with_weights(_reply(model), add), model, "weights-keys")


# --- record keys -----------------------------------------------------------------------------


@pytest.mark.parametrize("key", [ARRAYS, METRICS, CLIENT, LABEL_COUNTS])
def test_missing_record_is_rejected(model, key) -> None:
    content = _reply(model)
    del content[key]
    _assert_rejected(content, model, "record-keys")


def test_extra_record_is_rejected(model) -> None:
    content = _reply(model)
    content["raw-images"] = ArrayRecord({"x": Array(np.zeros((10, 8, 8), np.float32))})
    _assert_rejected(content, model, "record-keys")


# --- counts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_examples", [0, -1, MAX_SAMPLES_PER_CLIENT + 1])
def test_insane_num_examples_is_rejected(model, num_examples) -> None:
    content = _reply(model)
    content[METRICS] = MetricRecord({"num-examples": num_examples, "train-loss": 0.5})
    _assert_rejected(content, model, "num-examples")


def test_float_num_examples_is_rejected(model) -> None:
    content = _reply(model)
    content[METRICS] = MetricRecord({"num-examples": 10.0, "train-loss": 0.5})
    _assert_rejected(content, model, "num-examples")


def test_negative_partition_id_is_rejected(model) -> None:
    content = _reply(model)
    content[CLIENT] = ConfigRecord({"partition-id": -1})
    _assert_rejected(content, model, "partition-id")


@pytest.mark.parametrize(
    "counts",
    [
        [3, -1, 6, 2],  # negative
        [3, 0, 5],  # too short
        [3, 0, 5, 2, 0],  # too long
        [3.0, 0.0, 5.0, 2.0],  # floats
    ],
)
def test_malformed_label_counts_are_rejected(model, counts) -> None:
    content = _reply(model)
    content[LABEL_COUNTS] = MetricRecord({"counts": counts})
    _assert_rejected(content, model, "label-counts")


def test_label_counts_must_sum_to_num_examples(model) -> None:
    content = _reply(model, num_examples=sum(COUNTS) + 1)
    _assert_rejected(content, model, "label-counts-sum")


# --- prototypes ------------------------------------------------------------------------------


def test_prototypes_when_none_were_asked_for_are_rejected(model) -> None:
    content = _reply(model, prototypes=_prototypes(model.feature_dim, [0, 2]))
    _assert_rejected(content, model, "prototypes-unexpected", expect_prototypes=False)


def test_prototypes_of_wrong_dimension_are_rejected(model) -> None:
    content = _reply(model, prototypes=_prototypes(model.feature_dim + 1, [0, 2]))
    _assert_rejected(content, model, "prototypes-shape")


def test_prototypes_of_wrong_dtype_are_rejected(model) -> None:
    content = _reply(model)
    content[PROTOTYPES] = ArrayRecord(
        {
            "features": Array(np.zeros((1, model.feature_dim), np.float64)),
            "classes": Array(np.zeros(1, np.int64)),
        }
    )
    _assert_rejected(content, model, "prototypes-shape")


def test_prototype_class_count_must_match_feature_rows(model) -> None:
    content = _reply(model)
    content[PROTOTYPES] = ArrayRecord(
        {
            "features": Array(np.zeros((2, model.feature_dim), np.float32)),
            "classes": Array(np.zeros(3, np.int64)),
        }
    )
    _assert_rejected(content, model, "prototypes-shape")


def test_prototypes_with_extra_arrays_are_rejected(model) -> None:
    content = _reply(model, prototypes=_prototypes(model.feature_dim, [0]))
    content[PROTOTYPES]["sample-ids"] = Array(np.arange(3))
    _assert_rejected(content, model, "prototypes-keys")


def test_non_finite_prototypes_are_rejected(model) -> None:
    prototypes = _prototypes(model.feature_dim, [0, 2])
    prototypes.features[1, 0] = float("nan")
    _assert_rejected(_reply(model, prototypes=prototypes), model, "prototypes-finite")


@pytest.mark.parametrize("cls", [-1, NUM_CLASSES])
def test_prototype_class_out_of_range_is_rejected(model, cls) -> None:
    content = _reply(model, prototypes=_prototypes(model.feature_dim, [0, cls]))
    _assert_rejected(content, model, "prototypes-classes")


def test_more_than_k_prototypes_per_class_are_rejected(model) -> None:
    classes = [2] * (PROTOS_PER_CLASS + 1)
    content = _reply(model, prototypes=_prototypes(model.feature_dim, classes))
    _assert_rejected(content, model, "prototypes-per-class")


def test_prototype_of_a_class_not_held_is_rejected(model) -> None:
    content = _reply(model, prototypes=_prototypes(model.feature_dim, [0, 1]))
    _assert_rejected(content, model, "prototypes-classes")


# --- generator -------------------------------------------------------------------------------


def test_generator_when_none_was_asked_for_is_rejected(model, generator_state) -> None:
    _assert_rejected(_reply(model, generator_state), model, "generator-unexpected")


def test_generator_of_wrong_shape_is_rejected(model) -> None:
    wider = build_generator(GeneratorSpec(SPEC.latent_dim, SPEC.image_shape, 8)).state_dict()
    _assert_rejected(_reply(model, wider), model, "generator-shape", expect_generator=True)


def test_generator_with_nan_is_rejected(model, generator_state) -> None:
    state = {k: v.clone() for k, v in generator_state.items()}
    state[_first_float_key(state)].view(-1)[0] = float("nan")
    _assert_rejected(_reply(model, state), model, "generator-finite", expect_generator=True)


def test_generator_with_missing_key_is_rejected(model, generator_state) -> None:
    state = dict(generator_state)
    del state[_first_float_key(state)]
    _assert_rejected(_reply(model, state), model, "generator-keys", expect_generator=True)


# --- robustness: a reply must never crash the server -----------------------------------------


@pytest.mark.parametrize(
    "metrics",
    [
        {"num-examples": sum(COUNTS), "train-loss": 0.5, "extra": 1.0},
        {"num-examples": sum(COUNTS)},
    ],
    ids=["extra-key", "missing-train-loss"],
)
def test_metrics_with_other_keys_are_rejected(model, metrics) -> None:
    content = _reply(model)
    content[METRICS] = MetricRecord(metrics)
    with pytest.raises(MalformedReplyError):
        _validate(content, model)


@pytest.mark.parametrize("key", [ARRAYS, PROTOTYPES])
def test_record_of_wrong_type_is_rejected(model, key) -> None:
    content = _reply(model)
    names = model.state_dict() if key == ARRAYS else ["features", "classes"]
    content[key] = ConfigRecord(dict.fromkeys(names, "x"))  # the right names, the wrong type
    with pytest.raises(MalformedReplyError):
        _validate(content, model)


def test_weight_of_unconvertible_dtype_is_rejected(model) -> None:
    content = _reply(model)
    key = _first_float_key(model.state_dict())
    shape = tuple(model.state_dict()[key].shape)
    content[ARRAYS][key] = Array(np.full(shape, "x"))
    with pytest.raises(MalformedReplyError):
        _validate(content, model)


def test_boolean_partition_id_is_rejected(model) -> None:
    content = _reply(model)
    content[CLIENT] = ConfigRecord({"partition-id": True})
    with pytest.raises(MalformedReplyError):
        _validate(content, model)


def test_negative_batchnorm_variance_is_rejected(model, generator_state) -> None:
    """Finite, the right shape, and it would turn the averaged model's outputs into NaN."""
    state = model.state_dict()
    key = next(k for k in state if k.endswith("running_var"))
    content = pack_train_reply(
        {**state, key: torch.full_like(state[key], -1e30)},
        num_examples=sum(COUNTS),
        train_loss=0.5,
        partition_id=2,
        label_counts=COUNTS,
    )
    _assert_rejected(content, model, "weights-batchnorm")
    content = _reply(model, generator_state=generator_state)
    key = next(k for k in generator_state if k.endswith("num_batches_tracked"))
    content["generator"][key] = Array(np.array(-5, dtype=np.int64))
    _assert_rejected(content, model, "generator-batchnorm", expect_generator=True)


@pytest.mark.parametrize(
    ("record", "extra", "rule"),
    [
        (CLIENT, ConfigRecord({"partition-id": 2, "note": "x" * 1000}), "client-keys"),
        (LABEL_COUNTS, MetricRecord({"counts": COUNTS, "more": [0.5] * 1000}), "label-counts-keys"),
    ],
)
def test_the_client_and_label_count_records_hold_exactly_their_keys(
    model, record, extra, rule
) -> None:
    content = _reply(model)
    content[record] = extra
    _assert_rejected(content, model, rule)


def test_an_oversized_prototype_bank_is_refused_before_it_is_copied(model) -> None:
    class NotToBeCopied(Array):
        def numpy(self):
            raise AssertionError("the bank was converted before its size was checked")

    rows = PROTOS_PER_CLASS * NUM_CLASSES + 1
    content = _reply(model)
    content[PROTOTYPES] = ArrayRecord(
        {
            "features": NotToBeCopied(np.zeros((rows, model.feature_dim), np.float32)),
            "classes": NotToBeCopied(np.zeros(rows, np.int64)),
        }
    )
    _assert_rejected(content, model, "prototypes-per-class")


def _evaluate_reply(**metrics) -> RecordDict:
    values = {"num-examples": 100, "accuracy": 0.5, "loss": 1.2, **metrics}
    return RecordDict({"metrics": MetricRecord({k: v for k, v in values.items() if v is not None})})


def test_a_well_formed_evaluate_reply_passes() -> None:
    validate_evaluate_reply(_evaluate_reply())


@pytest.mark.parametrize(
    ("content", "rule"),
    [
        (_evaluate_reply(accuracy=float("nan")), "accuracy"),
        (_evaluate_reply(accuracy=1.5), "accuracy"),
        (_evaluate_reply(loss=float("inf")), "loss"),
        (_evaluate_reply(loss=-1.0), "loss"),
        (_evaluate_reply(**{"num-examples": 0}), "num-examples"),
        (_evaluate_reply(**{"num-examples": 10**12}), "num-examples"),
        (_evaluate_reply(loss=None), "metrics-keys"),
        (_evaluate_reply(smuggled=1.0), "metrics-keys"),
        (RecordDict({"metrics": ConfigRecord({"accuracy": 0.5})}), "record-keys"),
        (RecordDict({}), "record-keys"),
    ],
)
def test_a_malformed_evaluate_reply_names_the_rule_it_breaks(content, rule) -> None:
    with pytest.raises(MalformedReplyError) as error:
        validate_evaluate_reply(content)
    assert error.value.rule == rule


# --- an attacker's values stay out of the error messages --------------------------------------

HUGE = 10_000_000


@pytest.mark.parametrize(
    ("record", "value", "rule"),
    [
        (CLIENT, ConfigRecord({"partition-id": "7" * HUGE}), "partition-id"),
        (CLIENT, ConfigRecord({"partition-id": 2, "width": b"\1" * HUGE}), "width"),
        (CLIENT, ConfigRecord({"partition-id": 2, "x" * HUGE: 1}), "client-keys"),
        (LABEL_COUNTS, MetricRecord({"counts": list(range(HUGE // 10))}), "label-counts"),
        (METRICS, MetricRecord({"num-examples": [0.5] * HUGE, "train-loss": 0.5}), "num-examples"),
    ],
)
def test_rejections_quote_a_bounded_slice_of_an_oversized_value(model, record, value, rule):
    """A 10 MB value in a reply is named in a message of a few hundred characters, its length
    said, never copied whole (the server must not hold more than the reply itself to refuse it:
    benchmarks/reply_memory.py)."""
    content = _reply(model)
    content[record] = value
    with pytest.raises(MalformedReplyError) as caught:
        _validate(content, model)
    assert caught.value.rule == rule
    assert len(str(caught.value)) < 400
    assert re.search(r"\(\d+ (long|items)\)", str(caught.value)), str(caught.value)


def test_brief_keeps_short_values_whole() -> None:
    assert brief("cnn") == "'cnn'" and brief(0.25) == "0.25" and brief([1, 2]) == "[1, 2]"
    assert brief(["a" * 100]) == "['" + "a" * 40 + "'... (100 long)]"
