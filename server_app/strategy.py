"""Server strategies: FedAvg with reply validation, and Mosaic on top of it.

``CheckedFedAvg`` is Flower's FedAvg plus three things every strategy here needs: each reply is
validated in one place before anything is averaged (a malformed one is dropped, logged and
counted), the client learning rate follows the run's schedule, and who took part is recorded.
FedProx is the same class with ``proximal-mu`` in the config (the client adds the term).

Dropouts and stragglers: a node that has not answered within ``round-timeout`` is recorded as
missing. A round with fewer than ``min-replies`` accepted replies is skipped: the global model
stays as it was, nothing of the round's replies is kept (no label counts, prototypes or
generators; for Mosaic, a skipped ``kd-round`` means no distillation in this run), the round is
recorded as skipped with the reason, and the next round starts as planned. A run never waits
longer than the timeout for a round and never stops because of one.

Resume: ``state_dict``/``load_state_dict`` carry what a strategy learned across a restart, and
``round_offset`` (the rounds done before this ``start``) turns Flower's loop counter into the
run's round number in every hook, so a resumed run sends and logs the same rounds as one that
never stopped.

``MosaicStrategy`` adds the Mosaic steps around FedAvg's aggregation: it keeps a bounded bank
of prototypes, stores each client's generator (sent once), and at ``kd-round`` builds the
per-class experts, trains the meta model on the bank and distills the MoE + meta teacher into
the FedAvg model on generator samples. The science lives in ``moe``, ``meta`` and ``distill``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.config import RunConfig
from common.data import DatasetInfo, generator_to_classifier_input
from common.models import Classifier, Generator, GeneratorSpec, build_generator
from common.records import (
    ARRAYS,
    METRICS,
    MalformedReplyError,
    TrainReply,
    record_to_state,
    state_signature,
    state_to_record,
    validate_evaluate_reply,
    validate_train_reply,
)
from server_app.distill import DistillResult, distill
from server_app.meta import MetaModel, MosaicTeacher, train_meta_model
from server_app.moe import (
    ExpertEnsemble,
    ProbabilityMixture,
    PrototypeBank,
    build_experts,
    label_share_weights,
)
from server_app.traffic import NodeTraffic, check_payload_limits, log_downlink, log_uplink

Evaluator = Callable[[torch.nn.Module], dict[str, float]]


@dataclass
class RoundLog:
    """Who took part in a round and what became of their replies."""

    sampled: list[int] = field(default_factory=list)
    replied: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)  # sampled, no reply within the timeout
    skipped: str = ""  # why the round was skipped (fewer than min-replies accepted); "" if not
    partitions: dict[int, int] = field(default_factory=dict)  # node id -> partition id
    seconds: float = 0.0
    mosaic: dict[str, float] = field(default_factory=dict)
    traffic: NodeTraffic = field(default_factory=dict)  # bytes per node, record (traffic.py)
    evaluate_rejected: dict[int, str] = field(default_factory=dict)  # malformed evaluate replies


class CheckedFedAvg(FedAvg):
    """FedAvg that validates every reply and follows the run config's lr schedule."""

    def __init__(self, cfg: RunConfig, template: Classifier, info: DatasetInfo) -> None:
        check_payload_limits(cfg)  # before a generator is built: fail fast, naming the keys
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            # never sample fewer nodes than a round needs replies (min-replies <= min-nodes)
            min_train_nodes=max(min(cfg.min_nodes, 2), cfg.min_replies),
            min_evaluate_nodes=min(cfg.min_nodes, 2),
            min_available_nodes=cfg.min_nodes,
        )
        self.cfg = cfg
        self.info = info
        self.template = template
        self.model_signature = state_signature(template.state_dict())
        self.rounds: dict[int, RoundLog] = {}
        self.label_counts: dict[int, list[int]] = {}  # partition id -> counts
        self.round_offset = 0  # rounds completed before this start() (set when resuming)
        self._round_started = 0.0
        self._instructions: list[Message] = []  # this round's train messages

    # --- schedule --------------------------------------------------------------------------
    def round_config(self, server_round: int) -> dict[str, bool | float]:
        """Per-round instructions to clients (the rest of the config they read themselves).

        Every strategy gives its clients the same learning rate schedule, ``lr`` up to the
        kd-round and ``finetune-lr`` after it, so that baselines do the same local work as
        Mosaic. A FedAvg kept at ``lr`` while Mosaic fine-tunes at a lower one credits the lr
        step to distillation (measured: it made up most of Mosaic's multi-round lead). Every
        strategy also says what it wants besides weights, as its reply check expects it: so
        strategies that ask the same send the same message (the benchmarks' reply cache shares
        client work between them).
        """
        cfg = self.cfg
        return {
            "lr": cfg.finetune_lr if server_round > cfg.kd_round else cfg.lr,
            "send-prototypes": self.prototypes_expected(server_round),
            "train-generator": self.generator_signature(server_round) is not None,
        }

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes as FedAvg does, with this round's learning rate and requests."""
        server_round += self.round_offset
        self._round_started = time.perf_counter()
        round_config = ConfigRecord({**config, **self.round_config(server_round)})
        messages = list(super().configure_train(server_round, arrays, round_config, grid))
        self._instructions = messages  # the grid gives them their message ids when it sends
        self.rounds[server_round] = RoundLog(sampled=[m.metadata.dst_node_id for m in messages])
        log_downlink(self.rounds[server_round].traffic, messages)
        return messages

    # --- aggregation -----------------------------------------------------------------------
    def prototypes_expected(self, server_round: int) -> bool:
        """Whether clients were asked for prototypes this round (FedAvg never asks)."""
        return False

    def generator_signature(self, server_round: int) -> dict | None:
        """Shapes a generator upload must have this round; None when none is expected."""
        return None

    def validate_replies(
        self, server_round: int, replies: Iterable[Message]
    ) -> list[tuple[Message, TrainReply]]:
        """Drop error replies and malformed ones (logged with the rule broken), decode the rest.

        The accepted replies come back ordered by (partition id, node id), whatever order they
        arrived in: floating-point sums depend on the order of their terms, and replies arrive
        in another order on every run of a simulation or deployment, so without this two runs
        with the same seed would end with different bits.
        """
        round_log = self.rounds.setdefault(server_round, RoundLog())
        accepted: list[tuple[int, int, Message, TrainReply]] = []
        for msg in replies:
            node = self._answering_node(msg)
            log_uplink(round_log.traffic, msg)
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
                )
            except MalformedReplyError as error:
                round_log.rejected[node] = error.rule
                log(WARNING, "round %d: rejected reply of node %d (%s)", server_round, node, error)
                continue
            round_log.partitions[node] = reply.partition_id
            accepted.append((reply.partition_id, node, msg, reply))
        accepted.sort(key=lambda entry: entry[:2])
        round_log.replied = [node for _, node, _, _ in accepted]
        answered = {*round_log.replied, *round_log.failed, *round_log.rejected}
        round_log.missing = [node for node in round_log.sampled if node not in answered]
        return [(msg, reply) for _, _, msg, reply in accepted]

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

    def keep_replies(self, server_round: int, accepted: list[tuple[Message, TrainReply]]) -> None:
        """Keep what the server needs from the accepted replies of a round that is not skipped."""
        for _, reply in accepted:
            self.label_counts.setdefault(reply.partition_id, reply.label_counts)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, then FedAvg over the accepted replies (weights and metrics only).

        Returns ``(None, None)`` for a round with fewer than ``min-replies`` accepted replies:
        Flower then keeps the previous global model.
        """
        server_round += self.round_offset
        accepted = self.validate_replies(server_round, replies)
        round_log = self.rounds[server_round]
        if len(accepted) < self.cfg.min_replies:
            round_log.skipped = (
                f"{len(accepted)} accepted replies, min-replies is {self.cfg.min_replies}"
            )
            log(WARNING, "round %d skipped (%s): model kept", server_round, round_log.skipped)
            round_log.seconds = time.perf_counter() - self._round_started
            return None, None
        self.keep_replies(server_round, accepted)
        fedavg_view = [_strip_to_fedavg(msg) for msg, _ in accepted]
        arrays, metrics = super().aggregate_train(server_round, fedavg_view)
        if arrays is not None:
            arrays = self._like_template(arrays)
            arrays = self.after_aggregation(server_round, arrays, accepted)
        self.rounds[server_round].seconds = time.perf_counter() - self._round_started
        return arrays, metrics

    def after_aggregation(
        self, server_round: int, arrays: ArrayRecord, accepted: list[tuple[Message, TrainReply]]
    ) -> ArrayRecord:
        """Hook for server-side work on the new global model; FedAvg keeps it as it is."""
        return arrays

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's, told the run's round number (see ``round_offset``)."""
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """FedAvg's over the well-formed replies, told the run's round number (``round_offset``).

        A malformed reply (:func:`validate_evaluate_reply`) is logged and left out, as in
        training; error replies go to FedAvg, which counts them as failures.
        """
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
        return super().aggregate_evaluate(server_round + self.round_offset, kept)

    # --- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What the strategy gathered so far, as plain data (see ``server_app.checkpoint``)."""
        return {
            "rounds": {r: asdict(round_log) for r, round_log in self.rounds.items()},
            "label-counts": dict(self.label_counts),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Take back what :meth:`state_dict` returned."""
        self.rounds = {r: RoundLog(**round_log) for r, round_log in state["rounds"].items()}
        self.label_counts = dict(state["label-counts"])

    def _like_template(self, arrays: ArrayRecord) -> ArrayRecord:
        """Cast averaged arrays back to the model's dtypes (FedAvg turns int counters to float)."""
        model = copy.deepcopy(self.template)
        model.load_state_dict(record_to_state(arrays))
        return state_to_record(model.state_dict())


def _strip_to_fedavg(msg: Message) -> Message:
    """A view of a reply with only what FedAvg averages (it demands exactly one ArrayRecord
    and one MetricRecord); the original keeps its prototypes and generator."""
    content = RecordDict({ARRAYS: msg.content[ARRAYS], METRICS: msg.content[METRICS]})
    view = copy.copy(msg)
    view.content = content
    return view


class MosaicStrategy(CheckedFedAvg):
    """FedAvg rounds, then MoE + meta-model distillation at ``kd-round``, then fine-tuning."""

    train_meta = True  # False: the teacher is the meta model's prior alone (mosaic-no-meta)

    def __init__(
        self,
        cfg: RunConfig,
        template: Classifier,
        info: DatasetInfo,
        *,
        device: torch.device,
        evaluate_model: Evaluator,
    ) -> None:
        super().__init__(cfg, template, info)
        self.device = device
        self.evaluate_model = evaluate_model
        self.generator_spec = GeneratorSpec(cfg.gen_latent_dim, info.image_shape, cfg.gen_channels)
        self.generators: dict[int, dict[str, torch.Tensor]] = {}  # partition id -> weights
        self.bank = PrototypeBank(max_rounds=cfg.proto_bank_rounds)
        self.meta_model: MetaModel | None = None
        self.sent_arrays: ArrayRecord | None = None  # the global model of the current round
        # Built once, off the global RNG, so the server's randomness does not depend on how
        # many replies were validated.
        with torch.random.fork_rng():
            self._generator_signature = state_signature(
                build_generator(self.generator_spec).state_dict()
            )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As FedAvg, remembering the model sent: the round's prototypes are features of it."""
        self.sent_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def prototypes_expected(self, server_round: int) -> bool:
        return server_round in self.cfg.prototype_rounds

    def generator_signature(self, server_round: int) -> dict | None:
        if server_round != self.cfg.generator_round_resolved:
            return None
        return self._generator_signature

    def keep_replies(self, server_round: int, accepted: list[tuple[Message, TrainReply]]) -> None:
        super().keep_replies(server_round, accepted)
        for _, reply in accepted:
            if reply.prototypes is not None:
                self.bank.add(server_round, reply.prototypes.features, reply.prototypes.classes)
            if reply.generator_state is not None:
                self.generators[reply.partition_id] = reply.generator_state

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["prototype-bank"] = self.bank.state_dict()
        state["generators"] = dict(self.generators)
        if self.meta_model is not None:
            state["meta-model"] = {
                "num-experts": self.meta_model.num_experts,
                "weights": {k: v.cpu() for k, v in self.meta_model.state_dict().items()},
            }
        return state

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.bank.load_state_dict(state["prototype-bank"])
        self.generators = dict(state["generators"])
        if "meta-model" in state:
            with torch.random.fork_rng():  # building it must not move the restored RNG
                meta = MetaModel(
                    state["meta-model"]["num-experts"],
                    self.info.num_classes,
                    prior=self.cfg.meta_prior != "none",
                )
            meta.load_state_dict(state["meta-model"]["weights"])
            self.meta_model = meta.to(self.device)

    def builds_teacher_after(self, server_round: int) -> bool:
        """Whether the teacher is built (and distilled) after this round: ``kd_rounds``."""
        return server_round in self.cfg.kd_rounds

    def after_aggregation(
        self, server_round: int, arrays: ArrayRecord, accepted: list[tuple[Message, TrainReply]]
    ) -> ArrayRecord:
        if not self.builds_teacher_after(server_round):
            return arrays
        states = [record_to_state(msg.content[ARRAYS]) for msg, _ in accepted]
        counts = np.array([reply.label_counts for _, reply in accepted])
        student = copy.deepcopy(self.template)
        student.load_state_dict(record_to_state(arrays))
        figures = self.distill_round(student, states, counts)
        self.rounds[server_round].mosaic = figures
        return state_to_record(student.state_dict())

    def build_teacher(
        self, states: list[dict[str, torch.Tensor]], counts: np.ndarray
    ) -> tuple[torch.nn.Module, dict[str, float]]:
        """The MoE + meta teacher: per-class experts, a prior, a meta model trained on the bank.

        The prior (``meta-prior``) is the label-share mixture of the client models themselves,
        or the experts' mean; the meta model starts from it and learns, on the prototypes, how
        the experts should correct it. With ``train_meta`` off (``mosaic-no-meta``) the
        teacher is the prior alone. Baselines that distill another teacher override this.
        """
        cfg = self.cfg
        ensemble = ExpertEnsemble(self.template, build_experts(states, counts)).to(self.device)
        prior = None
        if cfg.meta_prior == "label-share":
            weights = label_share_weights(counts)
            prior = ProbabilityMixture(self.client_models(states), weights).to(self.device)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            meta = MetaModel(
                ensemble.num_experts, self.info.num_classes, prior=cfg.meta_prior != "none"
            ).to(self.device)
        figures: dict[str, float] = {}
        if self.train_meta and not len(self.bank):
            log(INFO, "Mosaic: no prototypes in the bank; the meta model keeps its prior")
        elif self.train_meta:
            features, classes = self.bank.tensors()
            log(
                INFO,
                "Mosaic: %d experts, %s prior, %d prototypes in the bank",
                ensemble.num_experts,
                cfg.meta_prior,
                len(classes),
            )
            with torch.no_grad():
                features = features.to(self.device)
                inputs = ensemble.heads(features)
                priors = None if prior is None else prior.heads(features)
            trained = train_meta_model(
                meta,
                inputs,
                classes.to(self.device),
                priors=priors,
                epochs=cfg.meta_epochs,
                lr=cfg.meta_lr,
                batch_size=cfg.meta_batch_size,
                val_fraction=cfg.meta_val_fraction,
                patience=cfg.meta_patience,
                ema_decay=cfg.meta_ema,
                seed=cfg.seed,
                device=self.device,
                progress=lambda line: log(INFO, "Mosaic meta model: %s", line),
            )
            meta = trained.model
            figures["meta-val-accuracy"] = trained.val_accuracy
        self.meta_model = meta.eval()
        if prior is not None and not figures:  # figures hold the meta model's, once trained
            # An untrained meta model is its prior: skip running the experts on every KD step.
            return prior.eval(), figures
        body = self._sent_model() if figures and cfg.meta_features == "global" else None
        return MosaicTeacher(ensemble, meta, prior, body).to(self.device).eval(), figures

    def _sent_model(self) -> Classifier:
        """The global model this round's clients started from (``meta-features = global``)."""
        if self.sent_arrays is None:
            raise RuntimeError("meta-features 'global' needs the global model sent this round")
        model = copy.deepcopy(self.template)
        model.load_state_dict(record_to_state(self.sent_arrays))
        return model.eval()

    def client_models(self, states: list[dict[str, torch.Tensor]]) -> ExpertEnsemble:
        """The client models themselves, side by side (for the label-share and plain mixtures)."""
        return ExpertEnsemble(self.template, dict(enumerate(states))).to(self.device)

    def distill_round(
        self, student: Classifier, states: list[dict[str, torch.Tensor]], counts: np.ndarray
    ) -> dict[str, float]:
        """Teacher (:meth:`build_teacher`) -> transfer into ``student`` (:meth:`transfer`).

        The frame every distilling strategy shares: the teacher and the student before and after
        are evaluated, and the two phases timed (``meta-seconds``, ``kd-seconds``).
        """
        started = time.perf_counter()
        teacher, figures = self.build_teacher(states, counts)
        figures["meta-seconds"] = time.perf_counter() - started
        figures.update({f"teacher-{k}": v for k, v in self.evaluate_model(teacher).items()})
        figures.update({f"pre-kd-{k}": v for k, v in self.evaluate_model(student).items()})

        started = time.perf_counter()
        result = self.transfer(student, teacher, counts)
        if result is None:
            return figures
        figures["kd-seconds"] = time.perf_counter() - started
        figures["kd-agreement"] = result.teacher_student_agreement
        figures.update({f"post-kd-{k}": v for k, v in self.evaluate_model(student).items()})
        log(
            INFO,
            "%s: teacher %.4f, global before KD %.4f, after KD %.4f",
            self.cfg.strategy,
            figures["teacher-accuracy"],
            figures["pre-kd-accuracy"],
            figures["post-kd-accuracy"],
        )
        return figures

    def transfer(
        self, student: Classifier, teacher: torch.nn.Module, counts: np.ndarray
    ) -> DistillResult | None:
        """Distill ``teacher`` into ``student`` on the client generators' samples (in place).

        None when no generator arrived (nothing is distilled). DENSE overrides this with its
        own server-side generator (``server_app.dense``).
        """
        cfg = self.cfg
        generators, weights = self._generators(counts)
        if not generators:
            log(WARNING, "Mosaic: no generator arrived; distillation skipped")
            return None
        return distill(
            student,
            teacher,
            generators,
            to_input=lambda x: generator_to_classifier_input(x, self.info),
            steps=cfg.kd_steps,
            batch_per_generator=cfg.kd_batch_per_generator,
            lr=cfg.kd_lr,
            alpha=cfg.kd_alpha,
            beta=cfg.kd_beta,
            temperature=cfg.kd_temperature,
            generator_weights=weights,
            proximal_mu=cfg.kd_proximal_mu,
            ema=cfg.kd_ema,
            device=self.device,
            seed=cfg.seed,
            progress=lambda line: log(INFO, "Mosaic distillation: %s", line),
        )

    def _generators(self, counts: np.ndarray) -> tuple[list[Generator], list[float] | None]:
        generators = []
        for partition_id in sorted(self.generators):
            generator = build_generator(self.generator_spec)
            generator.load_state_dict(self.generators[partition_id])
            generators.append(generator.to(self.device))
        weighting = self.cfg.kd_generator_weighting
        if weighting == "uniform" or not generators:
            return generators, None
        held = {pid: self.label_counts[pid] for pid in sorted(self.generators)}
        if weighting == "size":
            return generators, [float(sum(c)) for c in held.values()]
        return generators, [float(sum(1 for n in c if n > 0)) for c in held.values()]
