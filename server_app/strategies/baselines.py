"""Baselines that run Mosaic's schedule with another teacher or another transfer.

Same data, partition, models, local work and seed as Mosaic; only the server's teacher (or the
way it reaches the global model) differs. Each is a leaf that overrides ``build_teacher`` and,
for DENSE, ``transfer``:

- ``ensemble``: the average of the client models' class probabilities. Not distilled: the
  teacher itself is the result (``teacher-accuracy`` at the kd-round).
- ``label-share``: client ``k``'s probability of class ``c`` weighted by ``n_kc / n_c``, its
  share of all class-``c`` samples. Uses only the label counts; not distilled.
- ``feddf``: the ``ensemble`` teacher distilled into the global model on generator data
  (FedDF-style: no experts, no meta model).
- ``dense``: DENSE-style (Zhang et al., NeurIPS 2022): the ``ensemble`` teacher distilled into
  the global model on samples of a generator the server trains from scratch, in alternation
  with the student, against the client models (``server_app.dense``).

None of them needs prototypes; the teachers that are not distilled need no generators, nor does
``dense``, whose generator is the server's.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
import torch
from flwr.common.logger import log
from torch import nn

from common.config import DENSE_KEYS, DISTILLATION_KEYS, SERVER_GENERATOR_KEYS
from common.data import generator_to_classifier_input
from common.models import Classifier
from common.wire import Uploads
from server_app.dense import train_dense
from server_app.distill import DistillResult
from server_app.moe import ProbabilityMixture
from server_app.strategies.teacher import (
    ClientModels,
    Figures,
    TeacherOnlyStrategy,
    TeacherStrategy,
)


def ensemble_teacher(strategy: TeacherStrategy, clients: ClientModels) -> ProbabilityMixture:
    """The plain ensemble: every client model's class probabilities, averaged."""
    weights = torch.full(clients.counts.shape, 1.0 / len(clients.states))
    teacher = ProbabilityMixture(strategy.client_models(clients.states), weights)
    return teacher.to(strategy.device).eval()


class EnsembleStrategy(TeacherOnlyStrategy):
    """The average of the client models' probabilities, reported as a teacher, not distilled."""

    def build_teacher(self, clients: ClientModels) -> tuple[nn.Module, Figures]:
        return ensemble_teacher(self, clients), {}


class LabelShareStrategy(TeacherOnlyStrategy):
    """Client probabilities weighted by their share of each class's samples; not distilled."""

    def build_teacher(self, clients: ClientModels) -> tuple[nn.Module, Figures]:
        return self.label_share_mixture(clients).eval(), {}


class FedDFStrategy(TeacherStrategy):
    """The ``ensemble`` teacher, distilled into the global model on generator samples."""

    def build_teacher(self, clients: ClientModels) -> tuple[nn.Module, Figures]:
        return ensemble_teacher(self, clients), {}


class DenseStrategy(TeacherStrategy):
    """The ``ensemble`` teacher, distilled on samples of a server-side generator (DENSE).

    Clients upload no generator; the server trains its own from scratch at the kd-round,
    alternating with the student (:func:`server_app.dense.train_dense`). Sizes come from the
    distillation keys (``kd-steps``, ``kd-lr``, ``kd-alpha``/``kd-beta``/``kd-temperature``; a
    batch is ``kd-batch-per-generator`` times the number of clients) and the generator's
    (``gen-lr``, ``gen-latent-dim``, ``gen-channels``); the weights of the generator loss are
    ``dense-lambda-bn`` and ``dense-lambda-adv``.
    """

    uploads = Uploads()
    reads = (
        DENSE_KEYS
        | SERVER_GENERATOR_KEYS
        | (
            DISTILLATION_KEYS
            - {
                "kd-generator-weighting",
                "kd-proximal-mu",
                "kd-ema",
                "kd-pool-batches",
                "kd-sub-models",
            }
        )
        | {"kd-every"}
    )

    def build_teacher(self, clients: ClientModels) -> tuple[nn.Module, Figures]:
        return ensemble_teacher(self, clients), {}

    def transfer(
        self, student: Classifier, teacher: nn.Module, clients: ClientModels
    ) -> DistillResult:
        if not isinstance(teacher, ProbabilityMixture):
            raise TypeError(f"DENSE needs the client ensemble as teacher, got {type(teacher)}")
        cfg = self.cfg
        members = list(teacher.clients.members)
        return train_dense(
            student,
            teacher,
            members,
            cfg.dense_training(len(members)),
            spec=self.generator_spec,
            num_classes=self.info.num_classes,
            classes=[int(c) for c in np.flatnonzero(clients.counts.sum(axis=0) > 0)],
            to_input=lambda x: generator_to_classifier_input(x, self.info),
            device=self.device,
            seed=cfg.seed,
            progress=lambda line: log(INFO, "DENSE: %s", line),
        )
