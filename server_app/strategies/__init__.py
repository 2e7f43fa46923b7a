"""The strategies, and the one registry that maps a run config's ``strategy`` to its class.

Everything else about a strategy is derived from its class here: what its clients upload
(``uploads``), the optional run-config keys its result depends on (``reads``), whether its
result is its teacher (a :class:`TeacherOnlyStrategy`), and its own config rules
(``check_config``). ``common.config.Strategy`` lists the same names for the schema;
tests/test_strategies.py ties the two together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.config import (
    CLIENT_GENERATOR_KEYS,
    DENSE_KEYS,
    DISTILLATION_KEYS,
    META_KEYS,
    PROTOTYPE_KEYS,
    SERVER_GENERATOR_KEYS,
    RunConfig,
    parse_run_config,
)
from common.wire import Uploads
from server_app.strategies.base import (
    CheckedFedAvg,
    ExclusiveFedAvg,
    FedProxStrategy,
    RoundLog,
)
from server_app.strategies.baselines import (
    DenseStrategy,
    EnsembleStrategy,
    FedDFStrategy,
    LabelShareStrategy,
)
from server_app.strategies.mosaic import MosaicNoMetaStrategy, MosaicStrategy
from server_app.strategies.teacher import TeacherOnlyStrategy, TeacherStrategy

__all__ = [
    "STRATEGIES",
    "STRATEGY_KEYS",
    "CheckedFedAvg",
    "RoundLog",
    "TeacherStrategy",
    "judged_by_teacher",
    "unread_keys",
    "uploads_of",
    "validate_run_config",
]

# Name -> class, in the order tables list them.
STRATEGIES: dict[str, type[CheckedFedAvg]] = {
    "fedavg": CheckedFedAvg,
    "fedavg-exclusive": ExclusiveFedAvg,
    "fedprox": FedProxStrategy,
    "ensemble": EnsembleStrategy,
    "label-share": LabelShareStrategy,
    "feddf": FedDFStrategy,
    "dense": DenseStrategy,
    "mosaic-no-meta": MosaicNoMetaStrategy,
    "mosaic": MosaicStrategy,
}

# The run-config keys that some strategies read and others do not: a result depends on those of
# them its class ``reads`` (and on every key outside this set).
STRATEGY_KEYS: frozenset[str] = (
    DISTILLATION_KEYS
    | META_KEYS
    | PROTOTYPE_KEYS
    | CLIENT_GENERATOR_KEYS
    | SERVER_GENERATOR_KEYS
    | DENSE_KEYS
    | {"meta-prior", "meta-prior-clients", "kd-every", "proximal-mu", "exclusive-width"}
    | {"min-claim-agreement"}
)


def uploads_of(name: str) -> Uploads:
    """What the clients of strategy ``name`` send besides weights and label counts."""
    return STRATEGIES[name].uploads


def judged_by_teacher(name: str) -> bool:
    """Whether the result of strategy ``name`` is its teacher (never transferred)."""
    return issubclass(STRATEGIES[name], TeacherOnlyStrategy)


def unread_keys(name: str) -> frozenset[str]:
    """The run-config keys the result of strategy ``name`` does not depend on."""
    return STRATEGY_KEYS - STRATEGIES[name].reads


def validate_run_config(values: Mapping[str, Any]) -> RunConfig:
    """The schema (:func:`common.config.parse_run_config`), then the chosen strategy's own
    rules: raise ``ConfigError`` naming the key. The ServerApp and the launchers call this."""
    cfg = parse_run_config(values)
    STRATEGIES[cfg.strategy].check_config(cfg)
    return cfg
