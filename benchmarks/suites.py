"""The benchmark's suites as data: protocols, cells (a method in a setting with a seed), and
the run config each cell runs under.

A record stays current as long as its cell's run config does, less the keys its strategy does
not read (``UNREAD_KEYS``); this module says what those configs are, ``benchmarks`` runs them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server_app.strategies import STRATEGIES, judged_by_teacher, unread_keys

# The two protocols as run-config overrides. One-shot: one round, every client trains longer,
# then the server builds its teacher (and distills) after that round. Multi-round: FedAvg
# warm-up, prototypes from round 3, teacher + distillation after round 5, fine-tuning after.
# One-shot clients train 5 epochs (the reference numbers' local work); multi-round clients take
# 50 SGD steps a round, as the default run. One-shot distillation is not pulled back to the
# FedAvg model (kd-proximal-mu 0): no FedAvg round follows it, and the one-round FedAvg model
# is a poor anchor (FashionMNIST alpha 0.1, seed 0: 82.8 unpulled, 77.9 at mu 1, 70.6 at 10).
# Nothing follows a one-shot distillation either, so it runs longer (1500 steps, the released
# code's 1500-2500) and keeps the moving average of the student (kd-ema 0.998): the last
# iterate drifts on generator samples (MNIST alpha 0.1: 300 steps 96.21 / 93.64 / 95.05 on
# seeds 0-2, 1500 steps 93.28 / 93.55 / 93.25), the average does not (docs/results.md).
# Multi-round Mosaic reads its experts' heads on the features of the model sent at kd-round
# (meta-features "global"), the inputs its meta model is trained on (prototypes of that model):
# FashionMNIST alpha 0.1, teacher 81.48 / 78.31 / 75.09 on seeds 0-2 against 77.96 / 61.26 /
# 68.20 with the experts in full (docs/results.md). One-shot has no earlier model to read.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "one-shot": {
        "num-rounds": 1,
        "kd-round": 1,
        "proto-start-round": 1,
        "local-epochs": 5.0,
        "kd-proximal-mu": 0.0,
        "kd-steps": 1500,
        "kd-ema": 0.998,
    },
    "multi-round": {
        "num-rounds": 10,
        "kd-round": 5,
        "proto-start-round": 3,
        "local-epochs": 0.0,
        "local-steps": 50,
        "meta-features": "global",
    },
}

# The width-tier setting (the paper's): 4 of 10 clients train the full CNN, 3 a half-width and
# 3 a quarter-width sub-model. Cells of that setting run under one of these variants (run-config
# overrides): "tiers" (HeteroFL's static slices), "tiers-rolling" (FedRolex's moving window),
# "smallest" (no tiers: every client on the quarter-width model, the baseline a width method
# must beat for its small clients), "tier-R-alone" (with fedavg-exclusive: the width-R clients
# alone, FedAvg on the width-R model: the bar for that tier's sub-model).
TIERS = "1:4,0.5:3,0.25:3"
ARCHITECTURES = "cnn:4,resnet8:3,mlp:3"
VARIANTS: dict[str, dict[str, Any]] = {
    "": {},
    "tiers": {"width-tiers": TIERS, "width-scheme": "static"},
    "tiers-rolling": {"width-tiers": TIERS, "width-scheme": "rolling"},
    # Distilled again after every round from the kd-round on (kd-every 1): FedRolex's later
    # rounds otherwise take back most of what one distillation gave (docs/results.md).
    "tiers-rolling-redistilled": {"width-tiers": TIERS, "width-scheme": "rolling", "kd-every": 1},
    "smallest": {"model-width": 0.25},
    "tier-0.5-alone": {"width-tiers": TIERS, "exclusive-width": 0.5},
    "tier-0.25-alone": {"width-tiers": TIERS, "exclusive-width": 0.25},
    # Mixed architectures: 4 of 10 clients run the CNN, 3 a ResNet-8, 3 an MLP; the server's
    # student is the CNN, and every other architecture is distilled too (kd-sub-models).
    "archs": {"architectures": ARCHITECTURES, "kd-sub-models": True},
}

# Every strategy in the registry's order (but fedavg-exclusive, which is FedAvg without
# width tiers); those whose result is their teacher (never
# distilled into the global model); and per strategy the run-config keys its result does not
# depend on, so that a record stays current when only these changed (a new distillation
# default does not rerun FedAvg). All three derive from the strategy classes;
# tests/test_benchmarks.py runs every strategy with its unread keys changed and checks that
# nothing moves.
ALL_STRATEGIES: list[str] = [name for name in STRATEGIES if name != "fedavg-exclusive"]
TEACHER_ONLY: frozenset[str] = frozenset(name for name in STRATEGIES if judged_by_teacher(name))
UNREAD_KEYS: dict[str, frozenset[str]] = {name: unread_keys(name) for name in STRATEGIES}


@dataclass(frozen=True)
class Cell:
    """One run of the benchmark: a method in a setting with a seed."""

    dataset: str
    alpha: float
    num_clients: int
    protocol: str
    strategy: str
    seed: int
    variant: str = ""  # a key of VARIANTS: "" for the homogeneous setting

    @property
    def setting(self) -> str:
        setting = f"{self.protocol} {self.dataset} alpha={self.alpha} clients={self.num_clients}"
        if self.variant == "archs":
            return setting + f", architectures {ARCHITECTURES}"
        return setting + (f", width tiers {TIERS}" if self.variant else "")

    @property
    def method(self) -> str:
        """The table's row: the strategy, and the variant it ran under."""
        return self.strategy + (f" ({self.variant})" if self.variant else "")

    @property
    def key(self) -> str:
        variant = f"-{self.variant}" if self.variant else ""
        return (
            f"{self.protocol}-{self.dataset}-a{self.alpha}-n{self.num_clients}{variant}"
            f"-{self.strategy}-s{self.seed}"
        )


@dataclass(frozen=True)
class Suite:
    """Cells and the run-config overrides (sizes, step counts) all of them share."""

    name: str
    cells: list[Cell]
    sizes: dict[str, Any] = field(default_factory=dict)


def grid(
    datasets: Sequence[str],
    alphas: Sequence[float],
    num_clients: int,
    protocol: str,
    strategies: Sequence[str],
    seeds: Sequence[int],
) -> list[Cell]:
    """Every combination, as cells."""
    return [
        Cell(dataset, alpha, num_clients, protocol, strategy, seed)
        for dataset in datasets
        for alpha in alphas
        for strategy in strategies
        for seed in seeds
    ]


def tier_cells(protocol: str, seeds: Sequence[int]) -> list[Cell]:
    """The width-tier table of one protocol: FedAvg on the smallest model, exclusive FedAvg,
    HeteroFL (and FedRolex in multi-round), the teachers, FedDF, Mosaic (and in multi-round
    Mosaic without its meta model), on FashionMNIST alpha 0.1 with 10 clients. Multi-round
    teacher methods run on FedRolex's rolling slices (the paper builds on it); one-shot has one
    round, where rolling is static."""
    methods = [
        ("fedavg", "smallest"),
        ("fedavg-exclusive", "tiers"),
        ("fedavg-exclusive", "tier-0.5-alone"),
        ("fedavg-exclusive", "tier-0.25-alone"),
        ("fedavg", "tiers"),
    ]
    tiers = "tiers"
    if protocol == "multi-round":
        methods.append(("fedavg", "tiers-rolling"))
        tiers = "tiers-rolling"
    # One-shot Mosaic has no prototypes to train its meta model on (none in round 1), so its
    # teacher is the prior and mosaic-no-meta would be the same run again.
    teachers = ["ensemble", "label-share", "feddf", "mosaic-no-meta", "mosaic"]
    if protocol == "one-shot":
        teachers.remove("mosaic-no-meta")
    methods += [(strategy, tiers) for strategy in teachers]
    if protocol == "multi-round":
        methods += [(s, "tiers-rolling-redistilled") for s in ("feddf", "mosaic-no-meta")]
    return [
        Cell("fashion-mnist", 0.1, 10, protocol, strategy, seed, variant)
        for strategy, variant in methods
        for seed in seeds
    ]


def architecture_cells(protocol: str, seeds: Sequence[int]) -> list[Cell]:
    """The mixed-architecture table of one protocol: FedAvg within each architecture group (its
    ``arch-<name>`` models are the groups trained alone), the ensemble and label-share teachers,
    FedDF, DENSE on the mixed ensemble, Mosaic's prior distilled (mosaic-no-meta) and Mosaic
    with its meta model trained on generated images (the suite's ``meta-input``: prototypes of
    different families share no space), FashionMNIST alpha 0.1, 10 clients."""
    methods = ["fedavg", "ensemble", "label-share", "feddf", "dense", "mosaic-no-meta", "mosaic"]
    return [
        Cell("fashion-mnist", 0.1, 10, protocol, strategy, seed, "archs")
        for strategy in methods
        for seed in seeds
    ]


SUITES: dict[str, Suite] = {
    # One setting, one seed, every method, modest steps: minutes on the 2-core CPU machine when
    # it is idle, under 20 when other jobs load it (docs/results.md has the timings).
    "quick": Suite(
        "quick",
        grid(["fashion-mnist"], [0.1], 5, "one-shot", ALL_STRATEGIES, [0]),
        sizes={
            "local-epochs": 1.0,
            "gen-steps": 50,
            "meta-epochs": 30,
            "kd-steps": 100,
            "kd-ema": 0.0,  # an average over 100 steps would still be mostly the start
            "model-width": 0.5,
        },
    ),
    # The table: hours on CPU.
    "full": Suite(
        "full",
        grid(["fashion-mnist", "mnist"], [0.1, 0.3, 0.5], 5, "one-shot", ALL_STRATEGIES, [0, 1, 2])
        + grid(["fashion-mnist"], [0.01, 0.1, 1.0], 10, "multi-round", ALL_STRATEGIES, [0, 1, 2]),
    ),
    # Width tiers (the paper's setting), both protocols, 3 seeds. The teacher labels 30 batches
    # once and distillation cycles through them (the default profile's setting, docs/speed.md):
    # a one-shot distillation of 1500 steps with the teacher labelling every batch took 10 min.
    # Distillation trains every tier's sub-model of the student too (kd-sub-models): into the
    # full model alone it wrecked the quarter-width slice (one-shot seed 0: 51.9 -> 25.0).
    "tiers": Suite(
        "tiers",
        tier_cells("one-shot", [0, 1, 2]) + tier_cells("multi-round", [0, 1, 2]),
        sizes={"kd-pool-batches": 30, "kd-sub-models": True},
    ),
    # Mixed architectures (CNN, ResNet-8, MLP), both protocols, 3 seeds; distillation as in
    # the tiers suite (a pool of 30 labelled batches). The meta model learns from generated
    # images and so reads the experts in full in both protocols (the multi-round protocol's
    # "global" reads heads on one model's features, which families do not share).
    "archs": Suite(
        "archs",
        architecture_cells("one-shot", [0, 1, 2]) + architecture_cells("multi-round", [0, 1, 2]),
        sizes={"kd-pool-batches": 30, "meta-input": "generated", "meta-features": "experts"},
    ),
}


def select_cells(suite: Suite, pattern: str) -> Suite:
    """The cells of ``suite`` whose key matches the shell-style ``pattern``, same sizes."""
    cells = [cell for cell in suite.cells if fnmatch.fnmatchcase(cell.key, pattern)]
    return Suite(suite.name, cells, suite.sizes)


def cell_run_config(
    cell: Cell, base: Mapping[str, Any], sizes: Mapping[str, Any], runs_dir: Path
) -> dict[str, Any]:
    """The run config of a cell: ``base``, then the protocol, the suite's sizes, the cell."""
    config = {**base, **PROTOCOLS[cell.protocol], **VARIANTS[cell.variant], **sizes}
    config.update(
        {
            "dataset": cell.dataset,
            "alpha": cell.alpha,
            "strategy": cell.strategy,
            "seed": cell.seed,
            "min-nodes": cell.num_clients,
            "results-dir": str(runs_dir),
            "run-name": cell.key,
            "resume": False,
        }
    )
    return config
