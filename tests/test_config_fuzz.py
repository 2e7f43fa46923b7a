"""Property-based tests of the run config schema: every invalid value is rejected with a message
naming its kebab key, and every valid config is accepted.

Valid and invalid values are derived from the schema itself (type, bounds, pattern, choices), so
a new key is fuzzed without touching this file; only the cross-field rules are spelled out here.
"""

import re
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import ConfigError, RunConfig, pyproject_defaults
from common.data import dataset_names
from common.models import classifier_names
from server_app.strategies import validate_run_config
from tests.fakedata import PYPROJECT

FUZZ = settings(max_examples=150, deadline=None, database=None)
PER_KEY = settings(max_examples=30, deadline=None, database=None)
FIELDS = RunConfig.model_fields
KEYS = sorted(field.alias for field in FIELDS.values())
NAME = {field.alias: name for name, field in FIELDS.items()}
DEFAULTS = pyproject_defaults(PYPROJECT)
CHOICES = {"dataset": dataset_names(), "model": classifier_names()}  # checked by name
UNBOUNDED = 10_000  # the largest value drawn for a key without an upper bound


def _bounds(key: str) -> dict[str, float]:
    bounds = {}
    for item in FIELDS[NAME[key]].metadata:
        for kind in ("ge", "gt", "le", "lt"):
            if getattr(item, kind, None) is not None:
                bounds[kind] = getattr(item, kind)
    return bounds


def _pattern(key: str) -> str | None:
    return next((m.pattern for m in FIELDS[NAME[key]].metadata if hasattr(m, "pattern")), None)


def _kind(key: str) -> Any:
    annotation = FIELDS[NAME[key]].annotation
    return Literal if get_origin(annotation) is Literal else annotation


def valid_values(key: str) -> st.SearchStrategy:
    kind, bounds = _kind(key), _bounds(key)
    if kind is Literal:
        return st.sampled_from(get_args(FIELDS[NAME[key]].annotation))
    if kind is bool:
        return st.booleans()
    if kind is int:
        low = bounds.get("ge", bounds.get("gt", -UNBOUNDED - 1) + 1)
        high = bounds.get("le", bounds.get("lt", low + UNBOUNDED + 1) - 1)
        return st.integers(low, high)
    if kind is float:
        low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
        high = high if high is not None else UNBOUNDED
        floats = st.floats(
            min_value=low,
            max_value=high,
            exclude_min="gt" in bounds,
            exclude_max="lt" in bounds,
            allow_nan=False,
            allow_infinity=False,
        )
        ints = [n for n in (0, 1, 2) if _inside(n, bounds)]  # TOML writes 1 for 1.0
        return floats | st.sampled_from(ints) if ints else floats
    if key in CHOICES:
        return st.sampled_from(CHOICES[key])
    if _pattern(key) is not None:
        return st.from_regex(_pattern(key), fullmatch=True)
    return st.text(max_size=20)


def _inside(value: float, bounds: dict[str, float]) -> bool:
    checks: dict[str, Callable[[float, float], bool]] = {
        "ge": lambda v, b: v >= b,
        "gt": lambda v, b: v > b,
        "le": lambda v, b: v <= b,
        "lt": lambda v, b: v < b,
    }
    return all(checks[kind](value, bound) for kind, bound in bounds.items())


def invalid_values(key: str) -> st.SearchStrategy:
    """Values of the wrong type, out of range, off the pattern, or not among the choices."""
    kind, bounds = _kind(key), _bounds(key)
    text = st.text(max_size=12)
    if kind is Literal:
        choices = get_args(FIELDS[NAME[key]].annotation)
        return text.filter(lambda s: s not in choices) | st.integers() | st.booleans()
    if kind is bool:
        return st.integers() | text | st.floats()
    if kind is int:
        wrong_type = st.floats() | st.booleans() | text | st.integers().map(str)
        return wrong_type | st.integers().filter(lambda n: not _inside(n, bounds))
    if kind is float:
        wrong_type = st.booleans() | text | st.sampled_from([float("nan"), float("inf")])
        out_of_range = st.floats(allow_nan=False).filter(lambda x: not _inside(x, bounds))
        return wrong_type | out_of_range
    wrong_type = st.integers() | st.floats() | st.booleans()
    if key in CHOICES:
        return wrong_type | text.filter(lambda s: s not in CHOICES[key])
    if _pattern(key) is not None:
        return wrong_type | text.filter(lambda s: re.fullmatch(_pattern(key), s) is None)
    return wrong_type


def _rejection(values: dict[str, Any]) -> str:
    try:
        validate_run_config(values)
    except ConfigError as error:
        return str(error)
    raise AssertionError(f"accepted: {values}")


def _names(message: str, key: str) -> bool:
    return f"\n  {key}: " in message


@st.composite
def valid_configs(draw) -> dict[str, Any]:
    """Every key within its range, then the keys that depend on others, drawn to fit them."""
    values = {key: draw(valid_values(key)) for key in KEYS}
    # Cross-field rules (RunConfig._check_cross_field and the strategies' check_config), drawn
    # in dependency order.
    values["num-rounds"] = draw(st.integers(1, 50))
    values["kd-round"] = draw(st.integers(1, values["num-rounds"]))
    values["proto-start-round"] = draw(st.integers(1, values["kd-round"]))
    values["generator-round"] = draw(st.integers(0, values["kd-round"]))
    values["min-replies"] = draw(st.integers(1, values["min-nodes"]))
    if values["strategy"] == "mosaic-no-meta" and values["meta-prior"] == "none":
        values["meta-prior"] = draw(st.sampled_from(["label-share", "experts"]))
    if values["strategy"] == "mosaic" and values["kd-round"] < 2:
        values["meta-features"] = "experts"
    if values["width-tiers"]:
        values["width-tiers"] = draw(st.sampled_from(["1:4,0.5:3,0.25:3", "0.25:2", "1:1,.5:1"]))
        values["model"], values["aggregation"] = "cnn", "mean"
    if values["architectures"]:
        values["architectures"] = draw(st.sampled_from(["cnn:4,resnet8:3,mlp:3", "mlp:1,cnn:2"]))
        values["model"] = draw(st.sampled_from(["cnn", "mlp"]))
        values["width-tiers"], values["aggregation"] = "", "mean"
        if values["strategy"] == "mosaic":
            values["meta-input"] = "generated"
    if values["strategy"] == "mosaic" and values["meta-input"] == "generated":
        values["meta-features"] = "experts"
    if values["strategy"] == "fedavg-exclusive":
        rates = [float(item.split(":")[0]) for item in values["width-tiers"].split(",") if item]
        values["exclusive-width"] = draw(st.sampled_from([1.0, *rates]))
    if values["resume"] and not values["run-name"]:
        values["run-name"] = draw(st.from_regex(_pattern("run-name"), fullmatch=True).filter(bool))
    if not values["server-test-set"] and values["fraction-evaluate"] == 0:
        values["fraction-evaluate"] = draw(st.floats(0.01, 1.0))
    if 0 < values["proto-max-samples"] < values["min-proto-samples"]:
        values["proto-max-samples"] = 0
    return values


@FUZZ
@given(valid_configs())
def test_every_valid_config_is_accepted(values) -> None:
    cfg = validate_run_config(values)
    for key, value in values.items():
        assert getattr(cfg, NAME[key]) == value, key


@pytest.mark.parametrize("key", KEYS)
@PER_KEY
@given(data=st.data())
def test_every_invalid_value_is_rejected_naming_its_key(key, data) -> None:
    value = data.draw(invalid_values(key))
    assert _names(_rejection({**DEFAULTS, key: value}), key)


# Each cross-field rule, broken on purpose: (the key it names, how to break it).
BROKEN_RULES: list[tuple[str, Callable[[Any, dict], dict]]] = [
    (
        "kd-round",
        lambda draw, v: {"strategy": "mosaic", "kd-round": v["num-rounds"] + draw(st.integers(1))},
    ),
    (
        "proto-start-round",
        lambda draw, v: {
            "strategy": "mosaic",
            "proto-start-round": v["kd-round"] + draw(st.integers(1, UNBOUNDED)),
        },
    ),
    (
        "generator-round",
        lambda draw, v: {
            "strategy": "mosaic",
            "generator-round": v["kd-round"] + draw(st.integers(1, UNBOUNDED)),
        },
    ),
    ("min-replies", lambda draw, v: {"min-replies": v["min-nodes"] + draw(st.integers(1))}),
    (
        "proto-max-samples",
        lambda draw, v: {
            "min-proto-samples": max(2, v["min-proto-samples"]),
            "proto-max-samples": draw(st.integers(1, max(2, v["min-proto-samples"]) - 1)),
        },
    ),
    ("resume", lambda draw, v: {"resume": True, "run-name": ""}),
    ("fraction-evaluate", lambda draw, v: {"server-test-set": False, "fraction-evaluate": 0.0}),
    ("meta-prior", lambda draw, v: {"strategy": "mosaic-no-meta", "meta-prior": "none"}),
    (
        "meta-features",
        lambda draw, v: {
            "strategy": "mosaic",
            "architectures": "",
            "meta-features": "global",
            "kd-round": 1,
            "proto-start-round": 1,
            "generator-round": draw(st.integers(0, 1)),
        },
    ),
    ("model", lambda draw, v: {"architectures": "mlp:1,resnet8:1", "model": "cnn"}),
    (
        "architectures",
        lambda draw, v: {
            "strategy": "mosaic",
            "meta-input": "prototypes",
            "architectures": "cnn:1,mlp:1",
            "model": "cnn",
            "width-tiers": "",
            "aggregation": "mean",
        },
    ),
]


@FUZZ
@given(valid_configs(), st.sampled_from(BROKEN_RULES), st.data())
def test_every_broken_cross_field_rule_is_rejected_naming_its_key(values, rule, data) -> None:
    key, breaking = rule
    broken = {**values, **breaking(data.draw, values)}
    assert _names(_rejection(broken), key)


@FUZZ
@given(
    st.sets(st.sampled_from(KEYS), min_size=1, max_size=5),
    st.from_regex(r"[a-z]+(-[a-z]+)*", fullmatch=True).filter(lambda k: k not in NAME),
)
def test_missing_and_unknown_keys_are_all_named(missing, unknown) -> None:
    values = {k: v for k, v in DEFAULTS.items() if k not in missing} | {unknown: 1}
    message = _rejection(values)
    assert all(_names(message, key) for key in [*missing, unknown])
