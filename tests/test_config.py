"""The run config schema and each strategy's own rules (``validate_run_config``): defaults and
profiles validate; every bad value names its key."""

from pathlib import Path

import pytest

from common.config import (
    ConfigError,
    RunConfig,
    load_profile,
    parse_run_config,
    pyproject_defaults,
)
from server_app.strategies import validate_run_config
from tests.fakedata import PYPROJECT

PROFILES = sorted((PYPROJECT.parent / "conf").glob("*.toml"))


@pytest.fixture
def defaults() -> dict:
    return pyproject_defaults(PYPROJECT)


def _error(values: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_run_config(values)
    return str(caught.value)


def _names(message: str, key: str) -> bool:
    """Each offending key opens its own line of the message: ``  <key>: <why>``."""
    return f"\n  {key}: " in message


def test_pyproject_defaults_validate(defaults) -> None:
    cfg = parse_run_config(defaults)
    assert isinstance(cfg, RunConfig)
    assert cfg.strategy == "mosaic"
    assert cfg.local_steps == defaults["local-steps"]


def test_every_default_key_is_a_schema_field(defaults) -> None:
    aliases = {field.alias for field in RunConfig.model_fields.values()}
    assert set(defaults) == aliases


def test_there_is_at_least_one_profile() -> None:
    assert PROFILES


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_profile_validates_over_the_defaults(profile: Path, defaults) -> None:
    cfg = load_profile(profile, defaults)
    assert cfg.num_rounds >= 1


def test_profile_with_an_unknown_key_is_rejected(tmp_path, defaults) -> None:
    profile = tmp_path / "bad.toml"
    profile.write_text("kd-stepz = 3\n")
    with pytest.raises(ConfigError, match="\n  kd-stepz: "):
        load_profile(profile, defaults)


def test_unknown_key_is_named(defaults) -> None:
    assert _names(_error({**defaults, "not-a-knob": 1}), "not-a-knob")


def test_missing_key_is_named(defaults) -> None:
    del defaults["kd-steps"]
    assert _names(_error(defaults), "kd-steps")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("local-steps", "50"),  # string for int
        ("local-steps", 50.0),  # float for int
        ("local-steps", True),  # bool for int
        ("num-rounds", 2.5),
        ("lr", "0.01"),  # string for float
        ("meta-prior", "mean"),  # not one of label-share | experts | none
        ("strategy", 1),
    ],
)
def test_wrong_type_is_named(defaults, key, value) -> None:
    assert _names(_error({**defaults, key: value}), key)


def test_int_is_accepted_for_a_float_key(defaults) -> None:
    """TOML and ``-c 'lr=1'`` give ints: a float knob must take them."""
    assert parse_run_config({**defaults, "lr": 1}).lr == 1.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("alpha", 0.0),
        ("alpha", -1.0),
        ("kd-steps", -1),
        ("lr", 0.0),
        ("lr", -0.1),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("num-rounds", 0),
        ("fraction-train", 0.0),
        ("fraction-train", 1.5),
        ("kd-alpha", 1.5),
        ("model-width", 0.0),
        ("gen-batch-size", 1),
        ("seed", -1),
        ("device", "tpu"),
        ("run-name", "a/b"),
        ("run-name", ".."),
        ("run-name", "."),
        ("run-name", ".hidden"),
        ("kd-temperature", 1e9),
        ("lr", 1e6),
        ("protos-per-class", 10**9),
        ("partitioning", "random"),
        ("kd-generator-weighting", "loss"),
        ("kd-proximal-mu", -0.5),
        ("kd-ema", 1.0),
    ],
)
def test_out_of_range_value_is_named(defaults, key, value) -> None:
    assert _names(_error({**defaults, key: value}), key)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"num-rounds": 4, "kd-round": 5}, "kd-round"),
        ({"kd-round": 3, "proto-start-round": 4}, "proto-start-round"),
        ({"kd-round": 3, "generator-round": 4}, "generator-round"),
    ],
)
def test_mosaic_cross_field_rule_is_named(defaults, overrides, key) -> None:
    assert _names(_error({**defaults, "strategy": "mosaic", **overrides}), key)


def test_min_replies_above_min_nodes_is_named(defaults) -> None:
    assert _names(_error({**defaults, "min-nodes": 2, "min-replies": 3}), "min-replies")
    assert parse_run_config({**defaults, "min-nodes": 3, "min-replies": 3}).min_replies == 3


def test_generator_round_zero_means_kd_round(defaults) -> None:
    cfg = parse_run_config({**defaults, "generator-round": 0, "kd-round": 4})
    assert cfg.generator_round_resolved == 4
    assert parse_run_config({**defaults, "generator-round": 2}).generator_round_resolved == 2


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_baselines_ignore_mosaic_schedule_rules(defaults, strategy) -> None:
    values = {
        **defaults,
        "strategy": strategy,
        "num-rounds": 2,
        "kd-round": 5,
        "proto-start-round": 6,
        "generator-round": 7,
    }
    assert validate_run_config(values).strategy == strategy


@pytest.mark.parametrize(
    ("key", "value"),
    [("dataset", "imagenet"), ("model", "vit"), ("strategy", "scaffold")],
)
def test_unknown_name_is_named(defaults, key, value) -> None:
    message = _error({**defaults, key: value})
    assert _names(message, key)
    assert repr(value) in message


def test_several_errors_are_all_named(defaults) -> None:
    message = _error({**defaults, "alpha": 0.0, "kd-steps": -5, "lr": "fast", "bogus-key": 1})
    for key in ("alpha", "kd-steps", "lr", "bogus-key"):
        assert _names(message, key)


def test_config_is_frozen(defaults) -> None:
    cfg = parse_run_config(defaults)
    with pytest.raises(ValueError, match="frozen"):
        cfg.lr = 1.0


@pytest.mark.parametrize(
    ("epochs", "num_samples", "expected"),
    [
        (0.0, 1000, 50),  # local-steps (the default's 50) when no epochs are set
        (1.0, 640, 10),  # one pass of batch 64
        (5.0, 650, 51),  # rounded up: 5 * 650 / 64 = 50.8
        (1.0, 10, 1),  # a client smaller than a batch still takes a step
    ],
)
def test_local_epochs_become_steps_per_client(epochs, num_samples, expected) -> None:
    cfg = parse_run_config({**pyproject_defaults(), "local-epochs": epochs, "local-steps": 50})
    assert cfg.local_steps_for(num_samples) == expected


def test_negative_local_epochs_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="local-epochs"):
        parse_run_config({**pyproject_defaults(), "local-epochs": -1.0})


@pytest.mark.parametrize(
    ("start", "kd_round", "rounds"), [(1, 1, []), (1, 3, [2, 3]), (3, 5, [3, 4, 5])]
)
def test_prototypes_are_never_asked_for_in_round_one(start, kd_round, rounds) -> None:
    """In round 1 the global model is untrained: no feature space the experts' heads share."""
    cfg = parse_run_config(
        {**pyproject_defaults(), "proto-start-round": start, "kd-round": kd_round}
    )
    assert list(cfg.prototype_rounds) == rounds


@pytest.mark.parametrize(
    ("every", "kd_rounds", "prototype_rounds"),
    [
        (0, [5], [3, 4, 5]),
        (1, [5, 6, 7, 8, 9, 10], list(range(3, 11))),
        (2, [5, 7, 9], [*range(3, 10)]),
    ],
)
def test_kd_every_repeats_distillation_with_fresh_prototypes(
    every, kd_rounds, prototype_rounds
) -> None:
    cfg = parse_run_config(
        {**pyproject_defaults(), "num-rounds": 10, "kd-round": 5, "kd-every": every}
    )
    assert cfg.kd_rounds == kd_rounds
    assert list(cfg.prototype_rounds) == prototype_rounds
