"""The run config schema: the one source of truth for every knob of a run.

Flower hands the app a flat ``context.run_config`` (the ``[tool.flwr.app.config]`` defaults of
pyproject.toml, merged with ``flwr run --run-config`` overrides). :func:`parse_run_config`
validates all of it before any training starts: an unknown key, a wrong type or an
out-of-range value raises :class:`ConfigError` with a message naming the key. Keys are
kebab-case (``local-steps``) in TOML and on the command line; attributes are snake_case.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.architectures import Architectures, parse_architectures
from common.data import dataset_names
from common.models import classifier_names, supports_width_tiers
from common.tiers import Tiers, parse_width_tiers

Strategy = Literal[
    "mosaic",
    "fedavg",
    "fedavg-exclusive",
    "fedprox",
    "ensemble",
    "label-share",
    "feddf",
    "mosaic-no-meta",
    "dense",
]
# Run-config keys of optional steps, by step; each strategy class declares which it reads
# (server_app.strategies derives from that what a result depends on).
PROTOTYPE_KEYS: frozenset[str] = frozenset(
    {
        "proto-start-round",
        "proto-bank-rounds",
        "protos-per-class",
        "min-proto-samples",
        "proto-max-samples",
    }
)
CLIENT_GENERATOR_KEYS: frozenset[str] = frozenset(
    {
        "generator-round",
        "gen-steps",
        "gen-batch-size",
        "lambda-adv",
        "lambda-div",
        "lambda-ent",
        "lambda-inv",
    }
)
SERVER_GENERATOR_KEYS: frozenset[str] = frozenset({"gen-latent-dim", "gen-channels", "gen-lr"})
GENERATOR_KEYS: frozenset[str] = CLIENT_GENERATOR_KEYS | SERVER_GENERATOR_KEYS
DISTILLATION_KEYS: frozenset[str] = frozenset(
    {
        "kd-steps",
        "kd-batch-per-generator",
        "kd-lr",
        "kd-alpha",
        "kd-beta",
        "kd-temperature",
        "kd-generator-weighting",
        "kd-proximal-mu",
        "kd-ema",
        "kd-pool-batches",
        "kd-generators-per-step",
        "kd-sub-models",
    }
)
META_KEYS: frozenset[str] = frozenset(
    {
        "meta-epochs",
        "meta-lr",
        "meta-batch-size",
        "meta-val-fraction",
        "meta-patience",
        "meta-ema",
        "meta-feedforward",
        "meta-features",
        "meta-input",
        "meta-samples",
        "meta-min-confidence",
    }
)
DENSE_KEYS: frozenset[str] = frozenset({"dense-lambda-bn", "dense-lambda-adv"})
# Run-config keys only the server reads: clients get what they need of the schedule (round,
# lr, FedProx's term, whether to send prototypes or a generator) in each message
# (``common.wire.RoundInstructions``). Two clients whose run configs differ only here
# train the same model; the benchmarks' reply cache relies on it (tests/test_reply_cache.py).
SERVER_ONLY_KEYS: frozenset[str] = (
    frozenset(
        {
            "strategy",
            "results-dir",
            "run-name",
            "resume",
            "num-rounds",
            "min-nodes",
            "fraction-train",
            "fraction-evaluate",
            "server-test-set",
            "test-samples",
            "tracking",
            "round-timeout",
            "min-replies",
            "lr",
            "finetune-lr",
            "kd-round",
            "kd-every",
            "proto-start-round",
            "proto-bank-rounds",
            "generator-round",
            "meta-prior",
            "meta-prior-clients",
            "proximal-mu",
            "max-update-ratio",
            "max-weight-ratio",
            "min-claim-agreement",
            "aggregation",
            "trim-fraction",
            "krum-malicious",
            "exclusive-width",
        }
    )
    | DISTILLATION_KEYS
    | META_KEYS
    | DENSE_KEYS
)
Partitioning = Literal["dirichlet", "iid", "pathological"]
GeneratorWeighting = Literal["uniform", "size", "coverage"]
# What the meta model starts from (and reads as one more gate token): the label-share mixture
# of the client models, the mean of the experts, or nothing (the released code).
MetaPrior = Literal["label-share", "experts", "none"]
# Where the trained meta model reads the experts on an image: every expert in full (the paper's
# code), or every expert's head on the features of the global model the kd-round sent, the
# feature space the prototypes it was trained on were taken in (docs/results.md).
MetaFeatures = Literal["experts", "global"]
# What the meta model is trained on: the clients' prototypes (features of their models: one
# space only when every client took them under the same global model), or samples of the
# clients' generators labelled by their owners' confident predictions, which every expert of any
# architecture reads in full (server_app.strategies.mosaic).
MetaInput = Literal["prototypes", "generated"]
# How FedAvg's rounds combine the client models: Flower's weighted mean, or its coordinate-wise
# median (FedMedian) or trimmed mean (FedTrimmedAvg), which no single client can move far, or
# the mean of the replies Multi-Krum keeps (the n - krum-malicious closest to the others).
Aggregation = Literal["mean", "median", "trimmed-mean", "multi-krum"]
# Which units of the global model a width-r client trains: the first ones (HeteroFL) or a
# window that moves one unit a round (FedRolex), so that every unit is trained evenly.
WidthScheme = Literal["static", "rolling"]
# Local training's augmentation: none, or the CIFAR recipe (a random crop of the image padded by
# 4 pixels, reflected, and a random horizontal flip), drawn per sample from the client's seed.
Augmentation = Literal["none", "crop-flip"]
Tracking = Literal["none", "tensorboard"]  # besides the results folder (server_app/tracking.py)
_TIER = r"(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?):[1-9][0-9]{0,5}"  # rate in (0, 1] : clients >= 1


# --- per-phase views: what each training loop reads, built from the run config ---------------
# Each loop takes one of these instead of a long list of keywords; the defaults are the ones a
# test or a notebook gets without a run config (the run's own values come from RunConfig).


@dataclass(frozen=True)
class LocalTraining:
    """A client's SGD in one round (``common.train.train_local``)."""

    steps: int
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    proximal_mu: float = 0.0  # FedProx's term, from the round's instructions
    augment: Augmentation = "none"


@dataclass(frozen=True)
class GeneratorTraining:
    """A client's generator training (``common.generator.train_generator``)."""

    steps: int
    batch_size: int = 64
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    lambda_adv: float = 1.0
    lambda_div: float = 5.0
    lambda_ent: float = 0.0
    lambda_inv: float = 0.0


@dataclass(frozen=True)
class MetaTraining:
    """The server's meta-model training (``server_app.meta.train_meta_model``)."""

    epochs: int
    lr: float = 1e-3
    batch_size: int = 128
    val_fraction: float = 0.2
    patience: int = 5
    ema_decay: float = 0.0


@dataclass(frozen=True)
class Distillation:
    """The server's distillation on client generators (``server_app.distill.distill``)."""

    steps: int
    batch_per_generator: int = 32
    lr: float = 1e-4
    alpha: float = 0.8
    beta: float = 1.0
    temperature: float = 1.0
    proximal_mu: float = 0.0
    ema: float = 0.0
    pool_batches: int = 0  # > 0: label this many batches once and cycle through them
    generators_per_step: int = 0  # > 0: each step samples this many generators, in turn
    sub_models: bool = False  # with width tiers: each tier's sub-model distilled too


@dataclass(frozen=True)
class DenseTraining:
    """DENSE's alternating generator and student steps (``server_app.dense.train_dense``)."""

    steps: int
    batch_size: int
    kd_lr: float = 1e-4
    gen_lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    lambda_bn: float = 1.0
    lambda_adv: float = 1.0
    generator_steps: int = 1
    alpha: float = 0.8
    beta: float = 1.0
    temperature: float = 1.0


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class ConfigError(ValueError):
    """A run config that must not start a run; the message names every offending key."""


class RunConfig(BaseModel):
    """Every setting of a run with its valid range.

    No defaults here on purpose: Flower always merges ``[tool.flwr.app.config]`` of
    pyproject.toml (the one place defaults live) under the overrides, so every key is present.
    """

    model_config = ConfigDict(
        alias_generator=_kebab,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        frozen=True,
        allow_inf_nan=False,  # TOML has inf and nan; no knob here means either
    )

    # --- run --------------------------------------------------------------------------------
    strategy: Strategy
    seed: int = Field(ge=0, le=2**32 - 1)
    partition_seed: int = Field(ge=-1, le=2**32 - 1)  # -1: the same as seed (data_seed)
    device: str = Field(pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    results_dir: str  # "" -> common.paths.results_root; an absolute path is safest
    # a plain folder name under results-dir: no "/", and not "." or ".." or any other dot-name
    run_name: str = Field(pattern=r"^([A-Za-z0-9_-][A-Za-z0-9._-]{0,199})?$")  # "": a timestamp
    resume: bool  # continue <results-dir>/<run-name> from its last checkpoint
    # --- data -------------------------------------------------------------------------------
    dataset: str
    data_root: str  # "" -> common.paths.data_root
    partitioning: Partitioning
    alpha: float = Field(gt=0, le=1e4)
    classes_per_client: int = Field(ge=1, le=100_000)
    min_partition_size: int = Field(ge=0, le=10_000_000)
    # --- model and FedAvg -------------------------------------------------------------------
    model: str
    model_width: float = Field(gt=0, le=4)
    # "" or "rate:clients,...", e.g. "1:4,0.5:3,0.25:3" (common.tiers)
    width_tiers: str = Field(pattern=rf"^({_TIER}(,{_TIER})*)?$", max_length=1_000)
    width_scheme: WidthScheme
    # "" or "model:clients,...", e.g. "cnn:4,resnet8:3,mlp:3" (common.architectures)
    architectures: str = Field(pattern=r"^[a-z0-9:,]*$", max_length=1_000)
    exclusive_width: float = Field(gt=0, le=1)  # fedavg-exclusive: average only this width
    num_rounds: int = Field(ge=1, le=100_000)
    min_nodes: int = Field(ge=1, le=100_000)  # wait until this many nodes are connected
    fraction_train: float = Field(gt=0, le=1)
    fraction_evaluate: float = Field(ge=0, le=1)
    server_test_set: bool  # false: the server holds no data; evaluation is federated only
    test_samples: int = Field(ge=0, le=10_000_000)  # > 0: evaluate on this many test samples
    tracking: Tracking  # "tensorboard": every round's scalars as TensorBoard events too
    round_timeout: float = Field(gt=0, le=604_800)
    min_replies: int = Field(ge=1, le=100_000)  # fewer accepted replies: the round is skipped
    local_steps: int = Field(ge=1, le=1_000_000)
    local_epochs: float = Field(ge=0, le=1000)  # > 0: epochs over the local data instead of steps
    batch_size: int = Field(ge=1, le=65_536)
    lr: float = Field(gt=0, le=10)
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0, le=1)
    augment: Augmentation  # local training: "crop-flip" for CIFAR-style data
    proximal_mu: float = Field(ge=0, le=1e4)  # FedProx only (sent in each round's message)
    # --- Mosaic schedule --------------------------------------------------------------------
    kd_round: int = Field(ge=1, le=100_000)  # W: meta model + distillation after this round
    kd_every: int = Field(ge=0, le=100_000)  # > 0: distill again every kd-every rounds
    finetune_lr: float = Field(gt=0, le=10)  # client lr after kd-round
    proto_start_round: int = Field(ge=1, le=100_000)  # R_p: clients upload prototypes from here
    proto_bank_rounds: int = Field(ge=1, le=100_000)  # B: the bank keeps the last B rounds
    protos_per_class: int = Field(ge=1, le=1_000)  # k: k-means centres per class per client
    proto_max_samples: int = Field(ge=0, le=10_000_000)  # per class; 0: every sample
    min_proto_samples: int = Field(ge=1, le=1_000_000)
    # --- generator (client side, trained once) ----------------------------------------------
    generator_round: int = Field(ge=0, le=100_000)  # 0 -> the kd-round
    gen_latent_dim: int = Field(ge=1, le=4_096)
    gen_channels: int = Field(ge=4)
    gen_steps: int = Field(ge=0, le=1_000_000)
    gen_batch_size: int = Field(ge=2, le=65_536)
    gen_lr: float = Field(gt=0, le=1)
    lambda_adv: float = Field(ge=0, le=1_000)
    lambda_div: float = Field(ge=0, le=1_000)
    lambda_ent: float = Field(ge=0, le=1_000)
    lambda_inv: float = Field(ge=0, le=1_000)
    # --- meta model (server) ----------------------------------------------------------------
    meta_epochs: int = Field(ge=0, le=100_000)
    meta_lr: float = Field(gt=0, le=1)
    meta_batch_size: int = Field(ge=1, le=1_000_000)
    meta_val_fraction: float = Field(ge=0, lt=1)
    meta_patience: int = Field(ge=1, le=100_000)
    meta_ema: float = Field(ge=0, lt=1)  # 0 = off; the released code uses 0.99
    meta_feedforward: int = Field(ge=1, le=65_536)  # the transformer's feed-forward width
    meta_prior: MetaPrior  # start from this ensemble and learn a correction
    meta_prior_clients: int = Field(ge=0, le=100_000)  # > 0: the label-share prior's models
    meta_features: MetaFeatures  # what the experts' heads read on an image
    meta_input: MetaInput  # what the meta model is trained on
    meta_samples: int = Field(ge=1, le=1_000_000)  # generated: images drawn per generator
    meta_min_confidence: float = Field(ge=0, le=1)  # generated: the owner's least confidence kept
    # --- distillation (server) --------------------------------------------------------------
    kd_steps: int = Field(ge=0, le=10_000_000)
    kd_batch_per_generator: int = Field(ge=1, le=4_096)
    kd_lr: float = Field(gt=0, le=1)
    kd_alpha: float = Field(ge=0, le=1)
    kd_beta: float = Field(ge=0, le=100)
    kd_temperature: float = Field(gt=0, le=100)
    kd_generator_weighting: GeneratorWeighting
    kd_proximal_mu: float = Field(ge=0, le=1e6)  # pull of the student back to the FedAvg model
    kd_ema: float = Field(ge=0, lt=1)  # 0 = last iterate; else EMA of the student's weights
    kd_pool_batches: int = Field(ge=0, le=1_000_000)  # > 0: teacher labels this many, reused
    kd_generators_per_step: int = Field(ge=0, le=100_000)  # > 0: a step samples this many
    kd_sub_models: bool  # width tiers: distill into each smaller tier's sub-model as well
    # --- defences (server_app/defences.py; 0 turns each off) --------------------------------
    max_update_ratio: float = Field(ge=0, le=1e6)  # refuse updates > this x the round's median
    max_weight_ratio: float = Field(ge=0, le=1e6)  # cap client weights at this x the median
    min_claim_agreement: float = Field(ge=0, le=1)  # label claims the models must back (ROC AUC)
    aggregation: Aggregation  # mean (FedAvg) | median | trimmed-mean
    trim_fraction: float = Field(ge=0, lt=0.5)  # trimmed-mean: the share cut at each end
    krum_malicious: int = Field(ge=0, le=100_000)  # multi-krum: clients assumed malicious
    # --- DENSE baseline (server-side generator; its sizes come from the keys above) ---------
    dense_lambda_bn: float = Field(ge=0, le=1_000)  # BatchNorm-statistics term, client models
    dense_lambda_adv: float = Field(ge=0, le=1_000)  # student-teacher disagreement term

    @model_validator(mode="after")
    def _check_cross_field(self) -> RunConfig:
        if self.dataset not in dataset_names():
            raise ValueError(f"dataset: {self.dataset!r} is not one of {dataset_names()}")
        if self.model not in classifier_names():
            raise ValueError(f"model: {self.model!r} is not one of {classifier_names()}")
        if self.width_tiers:
            try:
                parse_width_tiers(self.width_tiers)
            except ValueError as error:
                raise ValueError(f"width-tiers: {error}") from None
            if not supports_width_tiers(self.model):
                raise ValueError(
                    f"width-tiers: model {self.model!r} has no width plan (sub-models are cut "
                    "from: cnn)"
                )
            if self.aggregation != "mean":
                raise ValueError(
                    f"aggregation: {self.aggregation!r} cannot combine sub-models of different "
                    "widths; width-tiers average each coordinate over the clients that hold it "
                    "('mean')"
                )
        if self.architectures:
            try:
                names = [name for name, _ in parse_architectures(self.architectures)]
            except ValueError as error:
                raise ValueError(f"architectures: {error}") from None
            if self.model not in names:
                raise ValueError(
                    f"model: {self.model!r} is the student the server distills into and "
                    f"evaluates, so it must be one of architectures ({names})"
                )
            if self.width_tiers:
                raise ValueError(
                    "width-tiers: cannot be combined with architectures (clients run either "
                    "width sub-models of one model or models of several architectures)"
                )
            if self.aggregation != "mean":
                raise ValueError(
                    f"aggregation: {self.aggregation!r} is not defined across architectures; "
                    "each architecture's models are averaged over its own clients ('mean')"
                )
        if self.resume and not self.run_name:
            raise ValueError("resume: needs the run-name of the run to continue")
        if not self.server_test_set and self.fraction_evaluate == 0:
            raise ValueError(
                "fraction-evaluate: is 0 and server-test-set is false, so nothing would ever "
                "evaluate the model; let clients evaluate on their held-out data (e.g. 1.0)"
            )
        if 0 < self.proto_max_samples < self.min_proto_samples:
            raise ValueError(
                f"proto-max-samples: {self.proto_max_samples} is below min-proto-samples "
                f"{self.min_proto_samples}, so no class could form a prototype (0: every sample)"
            )
        if self.min_replies > self.min_nodes:
            raise ValueError(
                f"min-replies: {self.min_replies} is more than min-nodes {self.min_nodes}, so a "
                "run could start with too few nodes to ever complete a round"
            )
        return self

    @property
    def data_seed(self) -> int:
        """The seed of the data split and of who runs which tier: ``partition-seed``, or
        ``seed`` when that is -1. Separate, so one split can be trained with several seeds."""
        return self.seed if self.partition_seed < 0 else self.partition_seed

    @property
    def tiers(self) -> Tiers:
        """The width tiers as (rate, clients) pairs; () when every client trains the full model."""
        return parse_width_tiers(self.width_tiers)

    @property
    def architecture_rule(self) -> Architectures:
        """The architectures as (model, clients) pairs; () when every client runs ``model``."""
        return parse_architectures(self.architectures)

    @property
    def generator_round_resolved(self) -> int:
        """The round in which clients train and upload their generator (once per run)."""
        return self.generator_round or self.kd_round

    @property
    def kd_rounds(self) -> list[int]:
        """The rounds after which the server distills: ``kd-round``, then every ``kd-every``
        rounds to the last (``kd-every = 0``: once, the released code's schedule). Repeating
        it distills the teacher of the current client models each time, instead of leaving the
        global model to FedAvg fine-tuning after one distillation (docs/results.md measures
        both; the default stays once)."""
        if self.kd_every == 0:
            return [self.kd_round]
        return list(range(self.kd_round, self.num_rounds + 1, self.kd_every))

    @property
    def prototype_rounds(self) -> range:
        """The rounds in which clients send prototypes: ``proto-start-round`` to the last of
        :attr:`kd_rounds`, round 1 left out. Prototypes are scored by the experts' heads, which
        only read the feature space of the global model they all started from; in round 1 that
        model is the untrained initialisation, and features of each client's own model would be
        in a space the other heads do not share (in one-shot runs this lowered the teacher from
        87.9% to 74.1%). So a one-shot run has no prototypes and the meta model its prior."""
        return range(max(2, self.proto_start_round), self.kd_rounds[-1] + 1)

    def local_training(self, num_samples: int, lr: float, proximal_mu: float) -> LocalTraining:
        """The round's local SGD for a client holding ``num_samples`` (``lr`` and FedProx's
        term come with the round's instructions)."""
        return LocalTraining(
            steps=self.local_steps_for(num_samples),
            batch_size=self.batch_size,
            lr=lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            proximal_mu=proximal_mu,
            augment=self.augment,
        )

    @property
    def generator_training(self) -> GeneratorTraining:
        return GeneratorTraining(
            steps=self.gen_steps,
            batch_size=self.gen_batch_size,
            lr=self.gen_lr,
            lambda_adv=self.lambda_adv,
            lambda_div=self.lambda_div,
            lambda_ent=self.lambda_ent,
            lambda_inv=self.lambda_inv,
        )

    @property
    def meta_training(self) -> MetaTraining:
        return MetaTraining(
            epochs=self.meta_epochs,
            lr=self.meta_lr,
            batch_size=self.meta_batch_size,
            val_fraction=self.meta_val_fraction,
            patience=self.meta_patience,
            ema_decay=self.meta_ema,
        )

    @property
    def distillation(self) -> Distillation:
        return Distillation(
            steps=self.kd_steps,
            batch_per_generator=self.kd_batch_per_generator,
            lr=self.kd_lr,
            alpha=self.kd_alpha,
            beta=self.kd_beta,
            temperature=self.kd_temperature,
            proximal_mu=self.kd_proximal_mu,
            ema=self.kd_ema,
            pool_batches=self.kd_pool_batches,
            generators_per_step=self.kd_generators_per_step,
            sub_models=self.kd_sub_models,
        )

    def dense_training(self, num_clients: int) -> DenseTraining:
        """DENSE's steps; a batch is ``kd-batch-per-generator`` per client (at least 2, for
        the generator's BatchNorm)."""
        return DenseTraining(
            steps=self.kd_steps,
            batch_size=max(2, self.kd_batch_per_generator * num_clients),
            kd_lr=self.kd_lr,
            gen_lr=self.gen_lr,
            lambda_bn=self.dense_lambda_bn,
            lambda_adv=self.dense_lambda_adv,
            alpha=self.kd_alpha,
            beta=self.kd_beta,
            temperature=self.kd_temperature,
        )

    def local_steps_for(self, num_samples: int) -> int:
        """SGD steps of one round for a client holding ``num_samples``: ``local-steps``, or
        ``local-epochs`` passes over the data (rounded up, at least one step) when set."""
        if self.local_epochs == 0:
            return self.local_steps
        batch = min(self.batch_size, max(num_samples, 1))
        return max(1, math.ceil(self.local_epochs * num_samples / batch))


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(
            f"  {key}: {message} (got {item.get('input')!r})" if item["loc"] else f"  {message}"
        )
    return "invalid run config:\n" + "\n".join(lines)


def parse_run_config(values: Mapping[str, Any]) -> RunConfig:
    """Validate a flat run config (kebab-case keys); raise :class:`ConfigError` naming keys."""
    try:
        return RunConfig.model_validate(dict(values))
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def load_profile(path: str | Path, base: Mapping[str, Any] | None = None) -> RunConfig:
    """Validate a TOML profile (as passed to ``flwr run --run-config``) over ``base``."""
    with Path(path).open("rb") as handle:
        overrides = tomllib.load(handle)
    return parse_run_config({**(base or {}), **overrides})


def pyproject_defaults(pyproject: str | Path = "pyproject.toml") -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table: the defaults Flower merges overrides into."""
    with Path(pyproject).open("rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
