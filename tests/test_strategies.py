"""The strategy registry: one name per class, and what it derives from the classes."""

import typing

import pytest
import torch

from common.config import Strategy, pyproject_defaults
from server_app.strategies import (
    STRATEGIES,
    STRATEGY_KEYS,
    judged_by_teacher,
    unread_keys,
    uploads_of,
    validate_run_config,
)
from server_app.strategies.teacher import TeacherStrategy
from tests.runs import build_strategy


def test_the_config_names_exactly_the_registered_strategies() -> None:
    assert list(typing.get_args(Strategy)) == sorted(
        STRATEGIES, key=typing.get_args(Strategy).index
    )
    assert set(typing.get_args(Strategy)) == set(STRATEGIES)


def test_every_strategy_key_is_a_run_config_key() -> None:
    assert set(pyproject_defaults()) >= STRATEGY_KEYS


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_strategy_reads_only_strategy_keys_and_its_uploads_need_them(name: str) -> None:
    cls = STRATEGIES[name]
    assert cls.reads <= STRATEGY_KEYS
    assert unread_keys(name) == STRATEGY_KEYS - cls.reads
    uploads = uploads_of(name)
    assert not uploads.prototypes or "protos-per-class" in cls.reads
    assert not uploads.generator or "gen-steps" in cls.reads


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_teacher_only_strategy_never_transfers_and_builds_its_teacher_once(name: str) -> None:
    cfg = validate_run_config({**pyproject_defaults(), "strategy": name, "kd-every": 2})
    strategy = build_strategy(cfg)
    if not isinstance(strategy, TeacherStrategy):
        assert not judged_by_teacher(name)
        return
    student = torch.nn.Linear(1, 1)
    if judged_by_teacher(name):
        assert strategy.teacher_rounds() == [cfg.kd_round]
        assert strategy.transfer(student, student, None) is None
        assert uploads_of(name).generator is False
    else:
        assert strategy.teacher_rounds() == cfg.kd_rounds == [5, 7, 9]
