"""The base every strategy here shares: Flower's FedAvg with validated replies and one round
counter; FedProx is the same with its proximal term in the round's instructions.

``CheckedFedAvg`` is Flower's FedAvg plus what every strategy needs: each reply is validated
and decoded in one place (:func:`common.wire.validate_train_reply`) before anything is
averaged (a malformed one is dropped, logged and counted), the accepted replies are put in a
fixed order, the client learning rate follows the run's schedule, and who took part is
recorded. What clients upload besides weights is declared on the class (``uploads``), and so
are the optional run-config keys a strategy reads (``reads``); the registry derives the rest.

Dropouts and stragglers: a node that has not answered within ``round-timeout`` is recorded as
missing. A round with fewer than ``min-replies`` accepted replies is skipped: the global model
stays as it was, nothing of the round's replies is kept (no label counts, prototypes or
generators; for a teacher strategy, a skipped ``kd-round`` means no teacher in this run), the
round is recorded as skipped with the reason, and the next round starts as planned.

Width tiers (``width-tiers``): clients train width sub-models of the global model
(``common.submodels``). Each reply declares its width and is checked against that width's
shapes; a node whose width is known is sent only its slice; the round's average is taken per
coordinate over the clients that hold it (HeteroFL; FedRolex with ``width-scheme = rolling``),
and coordinates no client held keep their value. BatchNorm running statistics are kept per
tier (:meth:`CheckedFedAvg.keep_tier_statistics`): a channel's statistics in a 1/4-width
network are not those of the same channel in the full network (it sums a quarter of the
inputs), so each tier's sub-model is sent, evaluated and distilled with its own tier's.

Resume: ``state_dict``/``load_state_dict`` carry what a strategy learned across a restart.
Flower's ``start`` counts rounds from 1; :meth:`CheckedFedAvg.run_round` turns that counter into
the run's round number (adding ``rounds_done``, the rounds before this ``start``), and every
hook reads the round through it, so a resumed run sends and logs the same rounds as one that
never stopped.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from logging import WARNING
from typing import ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, MultiKrum

from common.architectures import ArchitectureSlicer
from common.config import ConfigError, RunConfig
from common.data import DatasetInfo
from common.models import Classifier, GeneratorSpec, build_generator
from common.submodels import WidthSlicer, average_covered
from common.tiers import tier_rates
from common.wire import (
    ARRAYS,
    METRICS,
    MalformedReplyError,
    RoundInstructions,
    TierShapes,
    TrainReply,
    Uploads,
    record_to_state,
    state_signature,
    state_to_record,
    validate_evaluate_reply,
    validate_train_reply,
)
from server_app.defences import (
    above_median,
    capped_sizes,
    computes_finite,
    partition_claims,
    update_norm,
)
from server_app.traffic import NodeTraffic, check_payload_limits, log_downlink, log_uplink

Evaluator = Callable[[torch.nn.Module], dict[str, float]]
# ``aggregation`` -> Flower's own aggregation of the round's validated replies (each reads only
# FedAvg's attributes, ``beta`` for the trimmed mean and the two Krum counts for Multi-Krum).
AGGREGATIONS = {
    "mean": FedAvg.aggregate_train,
    "median": FedMedian.aggregate_train,
    "trimmed-mean": FedTrimmedAvg.aggregate_train,
    "multi-krum": MultiKrum.aggregate_train,
}


@dataclass
class RoundLog:
    """Who took part in a round and what became of their replies."""

    sampled: list[int] = field(default_factory=list)
    replied: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    bounded: dict[int, str] = field(default_factory=dict)  # kept, with a rule limiting its say
    missing: list[int] = field(default_factory=list)  # sampled, no reply within the timeout
    skipped: str = ""  # why the round was skipped (fewer than min-replies accepted); "" if not
    partitions: dict[int, int] = field(default_factory=dict)  # node id -> partition id
    seconds: float = 0.0
    mosaic: dict[str, float] = field(default_factory=dict)  # the teacher's figures, if any
    traffic: NodeTraffic = field(default_factory=dict)  # bytes per node, record (traffic.py)
    evaluate_rejected: dict[int, str] = field(default_factory=dict)  # malformed evaluate replies


@dataclass(frozen=True)
class Accepted:
    """A reply that passed validation: the node that sent it and what it said, decoded."""

    node: int
    message: Message
    reply: TrainReply


class CheckedFedAvg(FedAvg):
    """FedAvg that validates every reply and follows the run config's lr schedule."""

    uploads: ClassVar[Uploads] = Uploads()  # what clients send besides weights and counts
    reads: ClassVar[frozenset[str]] = frozenset()  # the optional run-config keys it reads

    def __init__(
        self,
        cfg: RunConfig,
        template: Classifier,
        info: DatasetInfo,
        *,
        device: torch.device | None = None,
        evaluate_model: Evaluator | None = None,
    ) -> None:
        check_payload_limits(cfg, self.uploads)  # before a generator is built: fail fast
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            # never sample fewer nodes than a round needs replies (min-replies <= min-nodes)
            min_train_nodes=max(min(cfg.min_nodes, 2), cfg.min_replies),
            min_evaluate_nodes=min(cfg.min_nodes, 2),
            min_available_nodes=cfg.min_nodes,
        )
        self.cfg = cfg
        self.beta = cfg.trim_fraction  # what FedTrimmedAvg's aggregation reads
        self.info = info
        self.template = template
        self.device = device or torch.device("cpu")
        self.evaluate_model: Evaluator = evaluate_model or (lambda model: {})
        # where the clients' aggregated evaluation of each round goes, as ``federated-<metric>``
        self.on_federated_evaluation: Callable[..., None] = lambda server_round, **metrics: None
        self.model_signature = state_signature(template.state_dict())
        self.generator_spec = GeneratorSpec(cfg.gen_latent_dim, info.image_shape, cfg.gen_channels)
        self._generator_signature = None
        if self.uploads.generator:
            self._generator_signature = _generator_signature(self.generator_spec)
        # set when clients train sub-models: width slices, or the members of a model zoo
        self.slicer: WidthSlicer | ArchitectureSlicer | None = None
        # what a reply of each sub-model holds: per width < 1, or per architecture
        self.sub_models: dict[float | str, TierShapes] = {}
        if cfg.architecture_rule:
            names = [name for name, _ in cfg.architecture_rule]
            self.slicer = ArchitectureSlicer(
                names,
                cfg.model,
                num_classes=info.num_classes,
                in_shape=info.image_shape,
                model_width=cfg.model_width,
            )
            for name in names:
                member = self.slicer.template(name)
                self.sub_models[name] = TierShapes(
                    model=state_signature(member.state_dict()),
                    feature_dim=member.feature_dim,
                    generator=self._generator_signature,
                )
        if cfg.tiers:
            self.slicer = WidthSlicer(
                cfg.model,
                num_classes=info.num_classes,
                in_shape=info.image_shape,
                model_width=cfg.model_width,
                rolling=cfg.width_scheme == "rolling",
            )
            for rate in tier_rates(cfg.tiers):
                if rate != 1.0:
                    sub = self.slicer.template(rate)
                    self.sub_models[rate] = TierShapes(
                        model=state_signature(sub.state_dict()),
                        feature_dim=sub.feature_dim,
                        generator=_generator_signature(self.generator_spec.at_rate(rate))
                        if self.uploads.generator
                        else None,
                    )
        # node id -> the sub-model its replies declare (width, or architecture)
        self.node_widths: dict[int, float | str] = {}
        # width -> full-size running statistics averaged over that tier's clients only
        self.tier_statistics: dict[float, dict[str, torch.Tensor]] = {}
        self._statistic_keys = [key for key, _ in template.named_buffers()]
        self.partition_widths: dict[int, float | str] = {}  # partition id -> its sub-model
        self.rounds: dict[int, RoundLog] = {}
        self.label_counts: dict[int, list[int]] = {}  # partition id -> counts
        self.rounds_done = 0  # rounds completed before this start() (set when resuming)
        self.partition_owners: dict[int, int] = {}  # partition id -> the node answering for it
        self._sent_state: dict[str, torch.Tensor] | None = None  # this round's model, if needed
        self._connected: set[int] = set()  # the nodes connected when the round was configured
        # A fixed input to check that an aggregate computes finite outputs before it is adopted
        self._probe = torch.randn(2, *info.image_shape, generator=torch.Generator().manual_seed(0))
        self._round_started = 0.0
        self._instructions: list[Message] = []  # this round's train messages

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Rules of the run config that only this strategy has; raise ``ConfigError`` naming
        the key (the schema in ``common.config`` checks everything else)."""

    @staticmethod
    def config_error(key: str, why: str) -> ConfigError:
        """A :class:`ConfigError` worded as the schema's: the key opens its own line."""
        return ConfigError(f"invalid run config:\n  {key}: {why}")

    # --- the round counter ------------------------------------------------------------------
    def run_round(self, flower_round: int) -> int:
        """The run's round number for Flower's loop counter (which restarts at 1 on resume)."""
        return flower_round + self.rounds_done

    # --- schedule ---------------------------------------------------------------------------
    def instructions(self, server_round: int) -> RoundInstructions:
        """What every client is told this round besides the weights.

        Every strategy gives its clients the same learning rate schedule, ``lr`` up to the
        kd-round and ``finetune-lr`` after it, so that baselines do the same local work as
        Mosaic. A FedAvg kept at ``lr`` while Mosaic fine-tunes at a lower one credits the lr
        step to distillation (measured: it made up most of Mosaic's multi-round lead). Every
        strategy also says what it wants besides weights, as its reply check expects it.
        """
        cfg = self.cfg
        return RoundInstructions(
            lr=cfg.finetune_lr if server_round > cfg.kd_round else cfg.lr,
            send_prototypes=self.prototypes_expected(server_round),
            train_generator=self.generator_signature(server_round) is not None,
        )

    def prototypes_expected(self, server_round: int) -> bool:
        """Whether clients are asked for prototypes this round."""
        return self.uploads.prototypes and server_round in self.cfg.prototype_rounds

    def generator_signature(self, server_round: int) -> dict | None:
        """Shapes a generator upload must have this round; None when none is expected."""
        if server_round != self.cfg.generator_round_resolved:
            return None
        return self._generator_signature

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes as FedAvg does, with this round's instructions."""
        server_round = self.run_round(server_round)
        self._round_started = time.perf_counter()
        needs_sent = self.cfg.max_update_ratio > 0 or self.slicer is not None
        self._sent_state = record_to_state(arrays) if needs_sent else None
        self._connected = set(grid.get_node_ids())  # a partition's owner keeps it while connected
        round_config = ConfigRecord({**config, **self.instructions(server_round).to_config()})
        messages = list(super().configure_train(server_round, arrays, round_config, grid))
        self.send_slices(server_round, messages)
        self._instructions = messages  # the grid gives them their message ids when it sends
        self.rounds[server_round] = RoundLog(sampled=[m.metadata.dst_node_id for m in messages])
        log_downlink(self.rounds[server_round].traffic, messages)
        return messages

    def send_slices(self, server_round: int, messages: list[Message]) -> None:
        """Give each node whose width is known (from its replies) only its slice of the model;
        a node not heard from yet gets the full model and cuts its slice itself."""
        if self.slicer is None or self._sent_state is None:
            return
        slices: dict[float, ArrayRecord] = {}
        for message in messages:
            rate = self.node_widths.get(message.metadata.dst_node_id, 1.0)
            if rate == 1.0:  # in a zoo, a node not heard from gets the zoo (no member is 1.0)
                continue
            if rate not in slices:
                slices[rate] = state_to_record(self.sent_slice(server_round, rate))
            config = message.content[self.configrecord_key]
            message.content = RecordDict(
                {self.arrayrecord_key: slices[rate], self.configrecord_key: config}
            )

    # --- replies ----------------------------------------------------------------------------
    def validate_replies(self, server_round: int, replies: Iterable[Message]) -> list[Accepted]:
        """Drop error replies and malformed ones (logged with the rule broken), decode the rest
        and record their uplink bytes.

        The accepted replies come back ordered by (partition id, node id), whatever order they
        arrived in: floating-point sums depend on the order of their terms, and replies arrive
        in another order on every run of a simulation or deployment, so without this two runs
        with the same seed would end with different bits.
        """
        round_log = self.rounds.setdefault(server_round, RoundLog())
        accepted = []
        for msg in replies:
            node = self._answering_node(msg)
            if msg.has_error():
                round_log.failed[node] = msg.error.reason
                log(WARNING, "round %d: node %d failed: %s", server_round, node, msg.error.reason)
                continue
            try:
                reply = validate_train_reply(
                    msg.content,
                    model_signature=self.model_signature,
                    num_classes=self.info.num_classes,
                    feature_dim=self.template.feature_dim,
                    protos_per_class=self.cfg.protos_per_class,
                    prototypes_expected=self.prototypes_expected(server_round),
                    generator_signature=self.generator_signature(server_round),
                    sub_models=self.sub_models,
                )
            except MalformedReplyError as error:
                round_log.rejected[node] = error.rule
                log(WARNING, "round %d: rejected reply of node %d (%s)", server_round, node, error)
                continue
            # Sized once well-formed: sizing means serializing, and an attacker's 512 MiB
            # record would cost several times its size to measure (benchmarks/reply_memory.py)
            log_uplink(round_log.traffic, msg)
            round_log.partitions[node] = reply.partition_id
            accepted.append(Accepted(node, msg, reply))
        accepted = self.refuse_inside_the_rules(server_round, accepted)
        accepted.sort(key=lambda entry: (entry.reply.partition_id, entry.node))
        round_log.replied = [entry.node for entry in accepted]
        answered = {*round_log.replied, *round_log.failed, *round_log.rejected}
        round_log.missing = [node for node in round_log.sampled if node not in answered]
        return accepted

    def refuse_inside_the_rules(
        self, server_round: int, accepted: list[Accepted]
    ) -> list[Accepted]:
        """Well-formed replies the server still refuses (``server_app.defences``), each filed
        under ``rejected`` with its rule: a partition another node answers for
        (``partition-claimed``; an owner keeps its partition while it stays connected), label
        counts other than the partition sent before (``label-counts-changed``), and with
        ``max-update-ratio`` an update further from the sent model than that many times the
        round's median (``update-norm``)."""
        round_log = self.rounds[server_round]
        claims = [(entry.node, entry.reply.partition_id) for entry in accepted]
        self.partition_owners, refused = partition_claims(
            claims, self.partition_owners, self._connected | set(round_log.sampled)
        )
        rules = {entry.node: "partition-claimed" for entry in accepted if entry.node in refused}
        for entry in accepted:
            known = self.label_counts.get(entry.reply.partition_id)
            if entry.node not in rules and known is not None and known != entry.reply.label_counts:
                rules[entry.node] = "label-counts-changed"
            declared = entry.reply.sub_model
            width = self.partition_widths.get(entry.reply.partition_id, declared)
            if entry.node not in rules and width != declared:
                rules[entry.node] = "arch-changed" if entry.reply.arch else "width-changed"
        candidates = [entry for entry in accepted if entry.node not in rules]
        if self.cfg.max_update_ratio > 0 and self._sent_state is not None:
            norms = [
                update_norm(entry.reply.state, self.sent_slice(server_round, entry.reply.sub_model))
                for entry in candidates
            ]
            for entry, outlier in zip(
                candidates, above_median(norms, self.cfg.max_update_ratio), strict=True
            ):
                if outlier:
                    rules[entry.node] = "update-norm"
        for node, rule in rules.items():
            round_log.rejected[node] = rule
            log(WARNING, "round %d: refused reply of node %d (%s)", server_round, node, rule)
        kept = [entry for entry in accepted if entry.node not in rules]
        for entry in kept:
            self.node_widths[entry.node] = entry.reply.sub_model
        return kept

    def sent_slice(self, server_round: int, width: float | str) -> dict[str, torch.Tensor]:
        """The part of this round's global model a client at ``width`` was sent."""
        if self._sent_state is None:
            raise RuntimeError("the round's global model was not kept")
        if self.slicer is None or width == 1.0:
            return self._sent_state
        start = self.slicer.window_start(server_round)
        return self.slicer.slice(self.at_tier(self._sent_state, width), width, start)

    def full_size_states(
        self, server_round: int, accepted: list[Accepted], base: Mapping[str, torch.Tensor]
    ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]] | None]:
        """The accepted models written into ``base`` at their windows, with the coordinates
        each covers (None without width tiers: every model is already full-size)."""
        if self.slicer is None:
            return [entry.reply.state for entry in accepted], None
        start = self.slicer.window_start(server_round)
        embedded = [
            self.slicer.embed(entry.reply.state, entry.reply.sub_model, start, base)
            for entry in accepted
        ]
        return [state for state, _ in embedded], [mask for _, mask in embedded]

    def _answering_node(self, reply: Message) -> int:
        """The node a reply answers for. The SuperLink answers for a node it lost with an error
        reply from itself (source node id 1), so map replies through the instruction they
        answer (``reply_to_message_id``) to that instruction's destination."""
        destinations = {
            m.metadata.message_id: m.metadata.dst_node_id
            for m in self._instructions
            if m.metadata.message_id
        }
        return destinations.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def contributors(self, accepted: list[Accepted]) -> list[Accepted]:
        """The accepted replies this strategy builds its model from: all of them."""
        return accepted

    def keep_replies(self, server_round: int, accepted: list[Accepted]) -> None:
        """Keep what the server needs from the accepted replies of a round that is not skipped."""
        for entry in accepted:
            self.label_counts.setdefault(entry.reply.partition_id, entry.reply.label_counts)
            self.partition_widths.setdefault(entry.reply.partition_id, entry.reply.sub_model)

    # --- aggregation ------------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, then FedAvg over the accepted replies (weights and metrics only).

        Returns ``(None, None)`` for a round with fewer than ``min-replies`` accepted replies:
        Flower then keeps the previous global model.
        """
        server_round = self.run_round(server_round)
        accepted = self.contributors(self.validate_replies(server_round, replies))
        round_log = self.rounds[server_round]
        if len(accepted) < self.cfg.min_replies:
            round_log.skipped = (
                f"{len(accepted)} accepted replies, min-replies is {self.cfg.min_replies}"
            )
            log(WARNING, "round %d skipped (%s): model kept", server_round, round_log.skipped)
            round_log.seconds = time.perf_counter() - self._round_started
            return None, None
        self.keep_replies(server_round, accepted)
        sizes = self.client_weights(accepted)
        fedavg_view = [
            _strip_to_fedavg(entry.message, size)
            for entry, size in zip(accepted, sizes, strict=True)
        ]
        self.num_malicious_nodes = self.cfg.krum_malicious  # what MultiKrum reads
        self.num_nodes_to_select = max(1, len(fedavg_view) - self.cfg.krum_malicious)
        if self.slicer is None:
            aggregate = AGGREGATIONS[self.cfg.aggregation]
            arrays, metrics = aggregate(self, server_round, fedavg_view)
        else:
            arrays = self.average_sub_models(server_round, accepted, sizes)
            metrics = self.train_metrics_aggr_fn(
                [view.content for view in fedavg_view], self.weighted_by_key
            )
        if arrays is not None:
            # Loading into the template casts back to its dtypes (FedAvg turns int counters to
            # float); the same model is checked before the average is adopted.
            model = self._model_of(arrays)
            arrays = state_to_record(model.state_dict())
            if not computes_finite(model, self._probe):
                round_log.skipped = "aggregate-finite: the average computes NaN or Inf"
                log(WARNING, "round %d skipped (%s): model kept", server_round, round_log.skipped)
                round_log.seconds = time.perf_counter() - self._round_started
                return None, None
            arrays = self.after_aggregation(server_round, arrays, accepted)
        round_log.seconds = time.perf_counter() - self._round_started
        return arrays, metrics

    def average_sub_models(
        self, server_round: int, accepted: list[Accepted], sizes: list[int | None]
    ) -> ArrayRecord:
        """FedAvg per coordinate across widths (HeteroFL / FedRolex): each coordinate is the
        sample-weighted mean over the clients that held it, and keeps the sent value where none
        did. The global model's BatchNorm statistics are the full-width tier's (see
        :meth:`keep_tier_statistics`)."""
        base = self._sent_state if self._sent_state is not None else self.template.state_dict()
        states, masks = self.full_size_states(server_round, accepted, base)
        weights = [
            size or entry.reply.num_examples for size, entry in zip(sizes, accepted, strict=True)
        ]
        average = average_covered(states, masks or [], weights, base)
        if isinstance(self.slicer, ArchitectureSlicer):  # members share no statistics
            return state_to_record(self.slicer.global_state(average))
        self.keep_tier_statistics(accepted, states, masks or [], weights, average)
        return state_to_record(self.at_tier(average, 1.0))

    def keep_tier_statistics(
        self,
        accepted: list[Accepted],
        states: list[dict[str, torch.Tensor]],
        masks: list[dict[str, torch.Tensor]],
        weights: list[int],
        average: Mapping[str, torch.Tensor],
    ) -> None:
        """Each tier's BatchNorm running statistics, averaged per coordinate over that tier's
        clients only (static BatchNorm per width, as HeteroFL's sBN keeps statistics out of the
        shared average). A channel of a 1/4-width network sums a quarter of the inputs the same
        channel sums at full width, so the two tiers' statistics differ; one average over both
        normalises every width wrongly (measured in docs/results.md). Coordinates no client of
        the tier held this round keep the tier's previous statistics, else ``average``'s."""
        for rate in tier_rates(self.cfg.tiers):
            of_tier = [i for i, entry in enumerate(accepted) if entry.reply.width == rate]
            if not of_tier:
                continue
            previous = self.tier_statistics.get(rate, {})
            fallback = {key: previous.get(key, average[key]) for key in self._statistic_keys}
            self.tier_statistics[rate] = average_covered(
                [states[i] for i in of_tier],
                [masks[i] for i in of_tier],
                [weights[i] for i in of_tier],
                fallback,
            )

    def at_tier(self, state: Mapping[str, torch.Tensor], rate: float) -> dict[str, torch.Tensor]:
        """``state`` with the BatchNorm statistics of the tier at ``rate`` (unchanged when that
        tier has none yet): what a sub-model of that width is sent and evaluated with."""
        return {**state, **self.tier_statistics.get(rate, {})}

    def sub_model_metrics(self, model: Classifier) -> dict[str, float]:
        """With width tiers, each smaller tier's sub-model of ``model`` (the first units of
        every layer, as a node of that tier evaluates it), as ``width-<r>-<metric>``; in a
        federation of architectures, every member of the zoo, as ``arch-<name>-<metric>``."""
        if self.slicer is None:
            return {}
        metrics = {}
        for rate in self.sub_models:
            sub = copy.deepcopy(self.slicer.template(rate))
            sub.load_state_dict(self.slicer.slice(self.at_tier(model.state_dict(), rate), rate))
            prefix = f"arch-{rate}" if isinstance(rate, str) else f"width-{rate:g}"
            for key, value in self.evaluate_model(sub).items():
                metrics[f"{prefix}-{key}"] = value
        return metrics

    def client_weights(self, accepted: list[Accepted]) -> list[int | None]:
        """Each reply's aggregation weight: its ``num-examples``, at most ``max-weight-ratio``
        times the round's median (None: the reply's own count, untouched)."""
        sizes = [entry.reply.num_examples for entry in accepted]
        capped = capped_sizes(sizes, self.cfg.max_weight_ratio)
        return [
            None if bound >= size else max(1, int(bound))
            for size, bound in zip(sizes, capped, strict=True)
        ]

    def after_aggregation(
        self, server_round: int, arrays: ArrayRecord, accepted: list[Accepted]
    ) -> ArrayRecord:
        """Hook for server-side work on the new global model; FedAvg keeps it as it is."""
        return arrays

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's, told the run's round number."""
        return super().configure_evaluate(self.run_round(server_round), arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """FedAvg's over the well-formed replies, told the run's round number.

        A malformed reply (:func:`validate_evaluate_reply`) is logged and left out, as in
        training; error replies go to FedAvg, which counts them as failures.
        """
        server_round = self.run_round(server_round)
        round_log = self.rounds.setdefault(server_round, RoundLog())
        kept = []
        for msg in replies:
            if not msg.has_error():
                try:
                    validate_evaluate_reply(msg.content)
                except MalformedReplyError as error:
                    node = self._answering_node(msg)
                    round_log.evaluate_rejected[node] = error.rule
                    log(
                        WARNING,
                        "round %d: rejected evaluate reply of node %d (%s)",
                        server_round,
                        node,
                        error,
                    )
                    continue
            kept.append(msg)
        aggregated = super().aggregate_evaluate(server_round, kept)
        if aggregated:
            federated = {f"federated-{key}": value for key, value in aggregated.items()}
            self.on_federated_evaluation(server_round, **federated)
        return aggregated

    # --- results and checkpoint -------------------------------------------------------------
    def phase_of(self, server_round: int) -> str:
        """The name of the phase a round belongs to, for the wall-time summary."""
        return "federated-rounds"

    def state_dict(self) -> dict:
        """What the strategy gathered so far, as plain data (see ``server_app.checkpoint``)."""
        return {
            "rounds": {r: asdict(round_log) for r, round_log in self.rounds.items()},
            "label-counts": dict(self.label_counts),
            "widths": {"nodes": dict(self.node_widths), "partitions": dict(self.partition_widths)},
            "tier-statistics": {rate: dict(state) for rate, state in self.tier_statistics.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Take back what :meth:`state_dict` returned."""
        self.rounds = {r: RoundLog(**round_log) for r, round_log in state["rounds"].items()}
        self.label_counts = dict(state["label-counts"])
        widths = state.get("widths", {"nodes": {}, "partitions": {}})  # absent: before tiers
        self.node_widths, self.partition_widths = dict(widths["nodes"]), dict(widths["partitions"])
        self.tier_statistics = dict(state.get("tier-statistics", {}))

    def _model_of(self, arrays: ArrayRecord) -> Classifier:
        """The template architecture holding ``arrays``, in the template's dtypes."""
        model = copy.deepcopy(self.template)
        model.load_state_dict(record_to_state(arrays))
        return model


def _generator_signature(spec: GeneratorSpec) -> dict:
    """A generator's shapes, built off the global RNG so that the server's randomness does not
    depend on which strategy runs."""
    with torch.random.fork_rng():
        return state_signature(build_generator(spec).state_dict())


def _strip_to_fedavg(msg: Message, weight: int | None = None) -> Message:
    """A view of a reply with only what FedAvg averages (it demands exactly one ArrayRecord
    and one MetricRecord), weighted by ``weight`` if given; the original keeps its prototypes
    and generator."""
    metrics = msg.content[METRICS]
    if weight is not None:
        metrics = MetricRecord({**metrics, "num-examples": weight})
    arrays = ArrayRecord(dict(msg.content[ARRAYS].items()))  # FedMedian pops from its record
    content = RecordDict({ARRAYS: arrays, METRICS: metrics})
    view = copy.copy(msg)
    view.content = content
    return view


class ExclusiveFedAvg(CheckedFedAvg):
    """FedAvg over the clients of one width only (``exclusive-width``). At 1.0, the clients
    that train the full model: the bar a width method has to clear (dropping the small clients
    often beats slicing for them). At a smaller rate with static slices, that tier trained
    alone: its ``width-<r>`` sub-model is a width-r model FedAvg'd over its own clients only.
    Without tiers it is FedAvg."""

    reads = frozenset({"exclusive-width"})

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        if cfg.exclusive_width not in [rate for rate, _ in cfg.tiers] + [1.0]:
            raise cls.config_error(
                "exclusive-width",
                f"{cfg.exclusive_width} is neither 1.0 nor a rate of width-tiers, so no client "
                "would ever be averaged",
            )

    def contributors(self, accepted: list[Accepted]) -> list[Accepted]:
        return [entry for entry in accepted if entry.reply.width == self.cfg.exclusive_width]


class FedProxStrategy(CheckedFedAvg):
    """FedAvg whose clients add ``proximal-mu``/2 ||w - w_global||^2 to their loss; the term
    travels in every round's instructions, as Flower's own FedProx sends it."""

    reads = frozenset({"proximal-mu"})

    def instructions(self, server_round: int) -> RoundInstructions:
        return replace(super().instructions(server_round), proximal_mu=self.cfg.proximal_mu)
