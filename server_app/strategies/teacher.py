"""Strategies that build a teacher from the client models at ``kd-round`` and transfer it.

``TeacherStrategy`` is FedAvg plus one frame, shared by Mosaic and every baseline that builds a
teacher: after each round of the kd schedule (``RunConfig.kd_rounds``) it builds the teacher
from the round's accepted client models (:meth:`TeacherStrategy.build_teacher`, abstract),
evaluates it and the FedAvg model, transfers the teacher into that model
(:meth:`TeacherStrategy.transfer`: by default distillation on the clients' generator samples)
and evaluates the result. A leaf overrides only those two hooks and declares what its clients
upload; nothing branches on a strategy's name.

``TeacherOnlyStrategy`` is the frame for teachers reported as they are (the ensemble and the
label-share mixture): built once at ``kd-round``, evaluated, never transferred.
"""

from __future__ import annotations

import copy
import time
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log

from common.architectures import ArchitectureSlicer
from common.config import DISTILLATION_KEYS, GENERATOR_KEYS, RunConfig
from common.data import generator_to_classifier_input
from common.models import Classifier, Generator, build_generator
from common.submodels import SlicedView
from common.wire import Uploads, record_to_state, state_to_record
from server_app.defences import claim_scores, computes_finite, scale_counts, unsupported_claims
from server_app.distill import DistillResult, distill, draw_samples
from server_app.moe import (
    ExpertEnsemble,
    ProbabilityMixture,
    label_share_weights,
    strongest_holders,
)
from server_app.strategies.base import Accepted, CheckedFedAvg

Figures = dict[str, float]
CLAIM_SAMPLES = 256  # images per generator that the label-claim check scores every model on


@dataclass(frozen=True)
class ClientModels:
    """The accepted client models of a round, in partition order, with their label counts.

    With width tiers every state is full-size: a sub-model written at its window with zeros
    elsewhere, which computes what the sub-model computes (``WidthSlicer.padded``); ``masks``
    say which coordinates each client trained, and ``fallback`` (the round's global model) is
    what an expert keeps where no holder of its class trained.
    """

    states: list[dict[str, torch.Tensor]]
    counts: np.ndarray  # [clients, classes]
    masks: list[dict[str, torch.Tensor]] | None = None
    fallback: dict[str, torch.Tensor] | None = None
    partition_ids: list[int] | None = None  # whose each state is (generators are keyed by it)


class TeacherStrategy(CheckedFedAvg):
    """FedAvg rounds, a teacher built and transferred after each round of the kd schedule."""

    uploads = Uploads(generator=True)
    reads = DISTILLATION_KEYS | GENERATOR_KEYS | {"kd-every", "min-claim-agreement"}
    teacher_phase = "teacher"  # the name of the teacher's phase in the wall-time summary

    def __init__(self, cfg: RunConfig, *args, **kwargs) -> None:
        super().__init__(cfg, *args, **kwargs)
        self.generators: dict[int, dict[str, torch.Tensor]] = {}  # partition id -> weights
        # partition id -> the share of its samples in classes its model backs (last check)
        self.backed_share: dict[int, float] = {}
        self._unbacked: np.ndarray | None = None  # this round's refused claims, if checked

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """The teacher is built after ``kd-round``, from generators and prototypes sent by then."""
        if cfg.kd_round > cfg.num_rounds:
            raise cls.config_error(
                "kd-round",
                f"{cfg.kd_round} is after the last round (num-rounds = {cfg.num_rounds})",
            )
        if cfg.proto_start_round > cfg.kd_round:
            raise cls.config_error(
                "proto-start-round",
                f"{cfg.proto_start_round} is after kd-round {cfg.kd_round}, so the prototype "
                "bank would be empty",
            )
        if cfg.generator_round > cfg.kd_round:
            raise cls.config_error(
                "generator-round", f"{cfg.generator_round} is after kd-round {cfg.kd_round}"
            )

    # --- the hooks a leaf overrides ---------------------------------------------------------
    @abstractmethod
    def build_teacher(self, clients: ClientModels) -> tuple[torch.nn.Module, Figures]:
        """The teacher of this round and any figures of its making (e.g. the meta model's)."""

    def transfer(
        self, student: Classifier, teacher: torch.nn.Module, clients: ClientModels
    ) -> DistillResult | None:
        """Distill ``teacher`` into ``student`` on the client generators' samples (in place).

        None when no generator arrived (nothing is distilled).
        """
        cfg = self.cfg
        generators, weights = self._generators()
        if not generators:
            log(WARNING, "%s: no generator arrived; distillation skipped", cfg.strategy)
            return None
        return distill(
            student,
            teacher,
            generators,
            cfg.distillation,
            to_input=lambda x: generator_to_classifier_input(x, self.info),
            generator_weights=weights,
            sub_models=self.sub_model_views(student),
            device=self.device,
            seed=cfg.seed,
            progress=lambda line: log(INFO, "%s distillation: %s", cfg.strategy, line),
        )

    def teacher_rounds(self) -> list[int]:
        """The rounds after which a teacher is built (and transferred): the kd schedule."""
        return self.cfg.kd_rounds

    # --- the frame --------------------------------------------------------------------------
    def keep_replies(self, server_round: int, accepted: list[Accepted]) -> None:
        """Keep the generators; in a teacher round, check the label claims here, before the
        round's FedAvg weights are drawn, so that the model the student starts from already
        gives an unbacked claimant its reduced weight (:meth:`client_weights`)."""
        super().keep_replies(server_round, accepted)
        for entry in accepted:
            if entry.reply.generator_state is not None:
                self.generators[entry.reply.partition_id] = entry.reply.generator_state
        self._unbacked = None
        if server_round in self.teacher_rounds() and self.cfg.min_claim_agreement > 0:
            self._unbacked = self.unbacked_claims(server_round, accepted)

    def after_aggregation(
        self, server_round: int, arrays: ArrayRecord, accepted: list[Accepted]
    ) -> ArrayRecord:
        if server_round not in self.teacher_rounds():
            return arrays
        counts = np.array([entry.reply.label_counts for entry in accepted])
        weights = self.client_weights(accepted)
        if any(weight is not None for weight in weights):  # max-weight-ratio binds this round
            sizes = [w or e.reply.num_examples for w, e in zip(weights, accepted, strict=True)]
            counts = scale_counts(counts, sizes)
        global_state = record_to_state(arrays)
        zeros = {key: torch.zeros_like(tensor) for key, tensor in global_state.items()}
        states, masks = self.full_size_states(server_round, accepted, zeros)
        if self._unbacked is not None:
            counts = np.where(self._unbacked, 0, counts)
        clients = ClientModels(
            states,
            counts,
            masks,
            global_state if masks else None,
            [entry.reply.partition_id for entry in accepted],
        )
        student = copy.deepcopy(self.template)
        student.load_state_dict(global_state)
        figures = self.teach(student, clients)
        self.rounds[server_round].mosaic = figures
        if not computes_finite(student, self._probe):
            # The student is adopted only if it computes finite outputs; else FedAvg's model.
            log(
                WARNING,
                "round %d: the distilled model computes NaN or Inf: kept FedAvg's",
                server_round,
            )
            figures["student-rejected"] = 1.0
            return arrays
        return state_to_record(student.state_dict())

    def unbacked_claims(self, server_round: int, accepted: list[Accepted]) -> np.ndarray | None:
        """Which label claims ``[clients, classes]`` the clients' own models do not back
        (``min-claim-agreement``; None: no generator to check with): every generator's samples,
        labelled by their owner, are scored by every accepted model
        (:func:`~server_app.defences.claim_scores`), and a class a client claims but its model
        cannot tell apart weighs nothing in the experts and the prior. Each such client is filed
        under the round's ``bounded`` with the classes, and its FedAvg weight, from this
        round's average on, is scaled by the share of its samples the check backs
        (:meth:`client_weights`)."""
        partitions = sorted(self.generators)
        if not partitions:
            return None
        counts = np.array([entry.reply.label_counts for entry in accepted])
        zeros = {key: torch.zeros_like(t) for key, t in self.template.state_dict().items()}
        states, _ = self.full_size_states(server_round, accepted, zeros)
        position = {entry.reply.partition_id: i for i, entry in enumerate(accepted)}
        generators = [self.generator_of(pid).to(self.device) for pid in partitions]
        models = self.client_models(states)
        with torch.no_grad():
            outputs = [
                models(generator_to_classifier_input(images, self.info))
                for images in draw_samples(generators, CLAIM_SAMPLES, self.cfg.seed)
            ]
        scores = claim_scores(outputs, [position.get(pid, -1) for pid in partitions])
        refused = unsupported_claims(counts, scores, self.cfg.min_claim_agreement)
        for entry, row, classes in zip(accepted, counts, refused, strict=True):
            total = float(row.sum())
            backed = float(row[~classes].sum()) / total if total > 0 else 1.0
            self.backed_share[entry.reply.partition_id] = backed
            if classes.any():
                rule = f"label-claim-unbacked: classes {np.flatnonzero(classes).tolist()}"
                self.rounds[server_round].bounded[entry.node] = rule
                log(WARNING, "round %d: node %d %s", server_round, entry.node, rule)
        return refused

    def client_weights(self, accepted: list[Accepted]) -> list[int | None]:
        """FedAvg's weights (``max-weight-ratio`` included), each scaled, once
        ``min-claim-agreement`` has checked the client, by the share of its samples whose
        classes its model backs: a model that recognises none of the classes it claims (one
        trained on wrong labels) barely moves the average."""
        weights = super().client_weights(accepted)
        scaled = []
        for entry, weight in zip(accepted, weights, strict=True):
            share = self.backed_share.get(entry.reply.partition_id, 1.0)
            if share < 1.0:
                weight = max(1, int((weight or entry.reply.num_examples) * share))
            scaled.append(weight)
        return scaled

    def teach(self, student: Classifier, clients: ClientModels) -> Figures:
        """Build the teacher, transfer it into ``student``; evaluate both, before and after.

        The teacher and the student before and after are evaluated, and the phases timed
        (``meta-seconds``: building the teacher, ``kd-seconds``: the transfer, of which
        ``kd-teacher-seconds`` sampling and labelling, ``evaluation-seconds``: the three
        evaluations, the teacher's costing as many model passes as it has members).
        """
        started = time.perf_counter()
        teacher, figures = self.build_teacher(clients)
        figures["meta-seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        figures.update({f"teacher-{k}": v for k, v in self.evaluate_model(teacher).items()})
        figures.update({f"pre-kd-{k}": v for k, v in self._student_metrics(student).items()})
        figures["evaluation-seconds"] = time.perf_counter() - started

        started = time.perf_counter()
        result = self.transfer(student, teacher, clients)
        if result is None:
            return figures
        figures["kd-seconds"] = time.perf_counter() - started
        figures["kd-teacher-seconds"] = result.teacher_seconds
        figures["kd-agreement"] = result.teacher_student_agreement
        started = time.perf_counter()
        figures.update({f"post-kd-{k}": v for k, v in self._student_metrics(student).items()})
        figures["evaluation-seconds"] += time.perf_counter() - started
        if "teacher-accuracy" in figures:  # without a server test set there is nothing to say
            log(
                INFO,
                "%s: teacher %.4f, global before KD %.4f, after KD %.4f",
                self.cfg.strategy,
                figures["teacher-accuracy"],
                figures["pre-kd-accuracy"],
                figures["post-kd-accuracy"],
            )
        return figures

    def sub_model_views(self, student: Classifier) -> list[SlicedView]:
        """With ``kd-sub-models`` and width tiers: each smaller tier's sub-model of the student
        (the first units, as a node of that tier evaluates it, with that tier's BatchNorm
        statistics), for distillation to train too; with architectures, every member of the
        zoo besides the student (one distilled model per architecture, as FedDF keeps)."""
        if self.slicer is None or not self.cfg.kd_sub_models:
            return []
        if isinstance(self.slicer, ArchitectureSlicer):  # every other member of the zoo
            return [student.members[name] for name in self.sub_models if name != self.cfg.model]
        views = []
        for rate in self.sub_models:
            full = student
            if rate in self.tier_statistics:  # the statistics that width is evaluated with
                full = with_statistics(student, self.tier_statistics[rate]).to(self.device)
            views.append(SlicedView(self.slicer, full, rate))
        return views

    def _student_metrics(self, student: Classifier) -> dict[str, float]:
        """The student on the test set, and each smaller tier's sub-model of it."""
        return {**self.evaluate_model(student), **self.sub_model_metrics(student)}

    def client_models(self, states: list[dict[str, torch.Tensor]]) -> ExpertEnsemble:
        """The client models themselves, side by side (for the label-share and plain mixtures)."""
        return ExpertEnsemble(self.template, dict(enumerate(states))).to(self.device)

    def label_share_mixture(
        self, clients: ClientModels, max_clients: int = 0
    ) -> ProbabilityMixture:
        """Client probabilities weighted by each client's share of each class, over at most
        ``max_clients`` client models (:func:`strongest_holders`; 0: all of them)."""
        kept = strongest_holders(clients.counts, max_clients)
        models = self.client_models([clients.states[k] for k in kept])
        return ProbabilityMixture(models, label_share_weights(clients.counts[kept])).to(self.device)

    def generator_of(self, partition_id: int) -> Generator:
        """A client's uploaded generator, rebuilt at its width's size (on the CPU)."""
        width = self.partition_widths.get(partition_id, 1.0)
        rate = width if isinstance(width, float) else 1.0  # an architecture's: full size
        generator = build_generator(self.generator_spec.at_rate(rate))
        generator.load_state_dict(self.generators[partition_id])
        return generator

    def _generators(self) -> tuple[list[Generator], list[float] | None]:
        """The clients' generators in partition order, and their weights (``kd-generator-
        weighting``: None for uniform, else each holder's sample count or class coverage)."""
        generators = [self.generator_of(pid).to(self.device) for pid in sorted(self.generators)]
        weighting = self.cfg.kd_generator_weighting
        if weighting == "uniform" or not generators:
            return generators, None
        held = {pid: self.label_counts[pid] for pid in sorted(self.generators)}
        if weighting == "size":
            return generators, [float(sum(c)) for c in held.values()]
        return generators, [float(sum(1 for n in c if n > 0)) for c in held.values()]

    # --- results and checkpoint -------------------------------------------------------------
    def phase_of(self, server_round: int) -> str:
        if self.uploads.generator and server_round == self.cfg.generator_round_resolved:
            return "generator-round (local training + generator training)"
        return "warm-up-rounds" if server_round <= self.cfg.kd_round else "fine-tune-rounds"

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "generators": dict(self.generators),
            "backed-share": dict(self.backed_share),
        }

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.generators = dict(state["generators"])
        self.backed_share = dict(state.get("backed-share", {}))


class TeacherOnlyStrategy(TeacherStrategy):
    """A teacher reported as it is: built and evaluated once, at ``kd-round``, never
    transferred (the global model stays FedAvg's). Its clients upload nothing extra."""

    uploads = Uploads()
    reads = frozenset()

    def transfer(
        self, student: Classifier, teacher: torch.nn.Module, clients: ClientModels
    ) -> DistillResult | None:
        return None

    def teacher_rounds(self) -> list[int]:
        """Once, at kd-round (``kd-every`` moves nothing for a teacher that is not transferred)."""
        return [self.cfg.kd_round]


def with_statistics(
    model: torch.nn.Module, statistics: Mapping[str, torch.Tensor]
) -> torch.nn.Module:
    """A twin of ``model`` that holds ``model``'s own parameters (the same tensors, so a loss on
    the twin's outputs trains ``model``) and ``statistics`` as its buffers: a width sub-model
    distilled under its own tier's BatchNorm statistics while its weights stay the student's."""
    twin = copy.deepcopy(model)
    for name, parameter in model.named_parameters():
        owner, _, attribute = name.rpartition(".")
        setattr(twin.get_submodule(owner), attribute, parameter)
    with torch.no_grad():
        for name, buffer in twin.named_buffers():
            buffer.copy_(statistics[name])
    return twin
