"""Mosaic: per-class experts, a meta model trained on prototypes, distilled on generator data.

Clients upload their generator once and, in the prototype rounds, k-means centres of their
features under the global model; the server keeps a bounded bank of those prototypes. At
``kd-round`` it builds one expert per class from the client models (weighted by label counts),
a prior (``meta-prior``: the label-share mixture of the client models by default), and a meta
model that starts from the prior and learns from the bank how to correct it with the experts'
logits; that teacher is distilled into the FedAvg model on generator samples (the frame of
:class:`~server_app.strategies.teacher.TeacherStrategy`). The science lives in
``server_app.moe``, ``server_app.meta`` and ``server_app.distill``.

``MosaicNoMetaStrategy``, the ablation, leaves the meta model untrained: its teacher is the
prior alone.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.config import META_KEYS, PROTOTYPE_KEYS, RunConfig
from common.data import generator_to_classifier_input
from common.models import Classifier
from common.wire import Uploads, record_to_state
from server_app.distill import draw_samples
from server_app.meta import HeadsOnFeatures, MetaModel, MosaicTeacher, train_meta_model
from server_app.moe import (
    ExpertEnsemble,
    ProbabilityMixture,
    PrototypeBank,
    build_experts,
)
from server_app.strategies.base import Accepted
from server_app.strategies.teacher import ClientModels, Figures, TeacherStrategy


class MosaicStrategy(TeacherStrategy):
    """FedAvg rounds, then MoE + meta-model distillation at ``kd-round``, then fine-tuning."""

    uploads = Uploads(generator=True, prototypes=True)
    reads = (
        TeacherStrategy.reads | META_KEYS | PROTOTYPE_KEYS | {"meta-prior", "meta-prior-clients"}
    )
    teacher_phase = "meta-model"

    def __init__(self, cfg: RunConfig, *args, **kwargs) -> None:
        super().__init__(cfg, *args, **kwargs)
        self.bank = PrototypeBank(max_rounds=cfg.proto_bank_rounds)
        self.meta_model: MetaModel | None = None
        self.sent_arrays: ArrayRecord | None = None  # the global model of the current round

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if cfg.architectures and cfg.meta_input == "prototypes":
            raise cls.config_error(
                "architectures",
                "the meta model is trained on prototypes, and prototypes taken under models of "
                'different architectures share no feature space; set meta-input = "generated" '
                "(or use mosaic-no-meta, the prior distilled)",
            )
        if cfg.meta_input == "generated" and cfg.meta_features == "global":
            raise cls.config_error(
                "meta-features",
                "'global' reads the experts' heads on one model's features, where prototypes "
                "live; a meta model trained on generated images reads the experts in full "
                "('experts')",
            )
        if cfg.meta_features == "global" and cfg.kd_round < 2:
            raise cls.config_error(
                "meta-features",
                "'global' reads the experts' heads on the features of the global model sent in "
                "the kd-round, and at kd-round 1 that is the untrained initial model",
            )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ):
        """As FedAvg, remembering the model sent: the round's prototypes are features of it."""
        self.sent_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def prototypes_expected(self, server_round: int) -> bool:
        """Prototypes only when the meta model is trained on them (``meta-input``)."""
        return super().prototypes_expected(server_round) and self.cfg.meta_input == "prototypes"

    def keep_replies(self, server_round: int, accepted: list[Accepted]) -> None:
        """Keep the round's prototypes in the bank. With width tiers and ``meta-features =
        global`` only the full-width clients' are kept: the teacher reads the experts' heads on
        the global model's features, and only those clients took their prototypes under that
        model; a sub-model's features are another function of the image, whatever their
        width (measured: with them, the multi-round teacher fell below its prior)."""
        super().keep_replies(server_round, accepted)
        global_only = self.slicer is not None and self.cfg.meta_features == "global"
        for entry in accepted:
            prototypes = entry.reply.prototypes
            if prototypes is not None and not (global_only and entry.reply.width != 1.0):
                features = self.full_size_features(server_round, prototypes.features, entry)
                self.bank.add(server_round, features, prototypes.classes)

    def full_size_features(
        self, server_round: int, features: torch.Tensor, entry: Accepted
    ) -> torch.Tensor:
        """A sub-model's prototypes in the full model's feature space: its features at its
        window, zeros elsewhere (what the padded client model's head reads from them)."""
        if self.slicer is None or entry.reply.width == 1.0:
            return features
        start = self.slicer.window_start(server_round)
        kept = self.slicer.index(entry.reply.width, start)["head.weight"][1]
        full = features.new_zeros(features.shape[0], self.template.feature_dim)
        full[:, kept] = features
        return full

    def build_teacher(self, clients: ClientModels) -> tuple[torch.nn.Module, Figures]:
        """The MoE + meta teacher: per-class experts, a prior, a meta model trained on the bank.

        The prior (``meta-prior``) is the label-share mixture of the client models themselves,
        or the experts' mean; the meta model starts from it and learns, on the prototypes, how
        the experts should correct it (:meth:`fit_meta_model`).
        """
        cfg = self.cfg
        experts = build_experts(
            clients.states, clients.counts, masks=clients.masks, fallback=clients.fallback
        )
        ensemble = ExpertEnsemble(self.template, experts)
        ensemble = ensemble.to(self.device)
        prior = None
        if cfg.meta_prior == "label-share":
            prior = self.label_share_mixture(clients, cfg.meta_prior_clients)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            meta = self._new_meta_model(ensemble.num_experts).to(self.device)
        meta, figures = self.fit_meta_model(meta, ensemble, prior, clients)
        self.meta_model = meta.eval()
        if prior is not None and not figures:  # figures hold the meta model's, once trained
            # An untrained meta model is its prior: skip running the experts on every KD step.
            return prior.eval(), figures
        global_features = cfg.meta_features == "global" and cfg.meta_input == "prototypes"
        body = self._sent_model().to(self.device) if figures and global_features else None
        if prior is not None:  # the bar the trained meta model has to clear, read as it reads
            bar = prior if body is None else HeadsOnFeatures(prior, body)
            figures.update({f"prior-{k}": v for k, v in self.evaluate_model(bar).items()})
        return MosaicTeacher(ensemble, meta, prior, body).to(self.device).eval(), figures

    def _new_meta_model(self, num_experts: int) -> MetaModel:
        return MetaModel(
            num_experts,
            self.info.num_classes,
            prior=self.cfg.meta_prior != "none",
            dim_feedforward=self.cfg.meta_feedforward,
        )

    def fit_meta_model(
        self,
        meta: MetaModel,
        ensemble: ExpertEnsemble,
        prior: ProbabilityMixture | None,
        clients: ClientModels,
    ) -> tuple[MetaModel, Figures]:
        """Train the meta model on the prototype bank (the experts' heads over each prototype,
        and the prior's), or with ``meta-input = generated`` on the clients' generated images
        (:meth:`labelled_samples`, every expert in full); nothing to train on leaves it at its
        prior."""
        cfg = self.cfg
        if cfg.meta_input == "generated":
            images, classes = self.labelled_samples(clients)
            if not len(classes):
                log(INFO, "Mosaic: no confidently labelled generated image; the prior is kept")
                return meta, {}
            log(
                INFO,
                "Mosaic: %d experts, %d labelled generated images",
                ensemble.num_experts,
                len(classes),
            )
            with torch.no_grad():
                inputs = torch.cat([ensemble(chunk) for chunk in images.split(512)])
                priors = None
                if prior is not None:
                    priors = torch.cat([prior(chunk) for chunk in images.split(512)])
            trained = train_meta_model(
                meta,
                inputs,
                classes,
                cfg.meta_training,
                priors=priors,
                seed=cfg.seed,
                device=self.device,
                progress=lambda line: log(INFO, "Mosaic meta model: %s", line),
            )
            return trained.model, {
                "meta-val-accuracy": trained.val_accuracy,
                "meta-samples": float(len(classes)),
            }
        if not len(self.bank):
            log(INFO, "Mosaic: no prototypes in the bank; the meta model keeps its prior")
            return meta, {}
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
            cfg.meta_training,
            priors=priors,
            seed=cfg.seed,
            device=self.device,
            progress=lambda line: log(INFO, "Mosaic meta model: %s", line),
        )
        return trained.model, {"meta-val-accuracy": trained.val_accuracy}

    def labelled_samples(self, clients: ClientModels) -> tuple[torch.Tensor, torch.Tensor]:
        """The meta model's training set with ``meta-input = generated``: ``meta-samples``
        images from every client's generator (as classifier input), each labelled by its owner's
        model and kept when that model gives it a class the owner holds with at least
        ``meta-min-confidence``. The owner knows best what its generator imitates; the other
        experts, of any architecture, read the images in full, so the meta model learns to
        combine them on inputs every one of them can read."""
        cfg = self.cfg
        owners = {pid: i for i, pid in enumerate(clients.partition_ids or [])}
        partitions = [pid for pid in sorted(self.generators) if pid in owners]
        empty = torch.empty(0, dtype=torch.long, device=self.device)
        if not partitions:
            return torch.empty(0, *self.info.image_shape, device=self.device), empty
        models = self.client_models(clients.states)
        generators = [self.generator_of(pid).to(self.device) for pid in partitions]
        held = torch.as_tensor(clients.counts > 0, device=self.device)
        images, classes = [], []
        with torch.no_grad():
            drawn = draw_samples(generators, cfg.meta_samples, cfg.seed + 1)
            for pid, samples in zip(partitions, drawn, strict=True):
                x = generator_to_classifier_input(samples, self.info)
                owner = owners[pid]
                confidence, label = models.members[owner](x).softmax(dim=-1).max(dim=-1)
                keep = (confidence >= cfg.meta_min_confidence) & held[owner][label]
                images.append(x[keep])
                classes.append(label[keep])
        return torch.cat(images), torch.cat(classes)

    def _sent_model(self) -> Classifier:
        """The global model this round's clients started from (``meta-features = global``)."""
        if self.sent_arrays is None:
            raise RuntimeError("meta-features 'global' needs the global model sent this round")
        model = copy.deepcopy(self.template)
        model.load_state_dict(record_to_state(self.sent_arrays))
        return model.eval()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["prototype-bank"] = self.bank.state_dict()
        if self.meta_model is not None:
            state["meta-model"] = {
                "num-experts": self.meta_model.num_experts,
                "weights": {k: v.cpu() for k, v in self.meta_model.state_dict().items()},
            }
        return state

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.bank.load_state_dict(state["prototype-bank"])
        if "meta-model" in state:
            with torch.random.fork_rng():  # building it must not move the restored RNG
                meta = self._new_meta_model(state["meta-model"]["num-experts"])
            meta.load_state_dict(state["meta-model"]["weights"])
            self.meta_model = meta.to(self.device)


class MosaicNoMetaStrategy(MosaicStrategy):
    """Mosaic's teacher with an untrained meta model: its prior alone, distilled.

    The prior is ``meta-prior``: the label-share mixture of the client models by default, the
    mean of the experts with ``experts``. No prototypes are asked for.
    """

    uploads = Uploads(generator=True)
    reads = TeacherStrategy.reads | {"meta-prior", "meta-prior-clients"}
    teacher_phase = "teacher"

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        TeacherStrategy.check_config(cfg)  # no meta model is trained: its rules do not apply
        if cfg.meta_prior == "none":
            raise cls.config_error(
                "meta-prior", "mosaic-no-meta's teacher is the prior alone, so it cannot be 'none'"
            )

    def fit_meta_model(
        self,
        meta: MetaModel,
        ensemble: ExpertEnsemble,
        prior: ProbabilityMixture | None,
        clients: ClientModels,
    ) -> tuple[MetaModel, Figures]:
        return meta, {}
