"""Baselines that run Mosaic's schedule with another teacher: each overrides ``build_teacher``.

Same data, partition, models, local work and seed as Mosaic; only the server's teacher differs:

- ``ensemble``: the average of the client models' class probabilities. Not distilled: the
  teacher itself is the result (``teacher-accuracy`` at the kd-round).
- ``label-share``: client ``k``'s probability of class ``c`` weighted by ``n_kc / n_c``, its
  share of all class-``c`` samples. Uses only the label counts; not distilled.
- ``feddf``: the ``ensemble`` teacher distilled into the global model on generator data
  (FedDF-style: no experts, no meta model).
- ``mosaic-no-meta``: Mosaic's teacher with the meta model left untrained, that is its prior
  alone (``meta-prior``: the label-share mixture of the client models by default, the mean of
  the experts with ``experts``), distilled like Mosaic; the ablation of the meta model.
- ``dense``: DENSE-style (Zhang et al., NeurIPS 2022): the ``ensemble`` teacher distilled into
  the global model on samples of a generator the server trains from scratch, in alternation
  with the student, against the client models (``server_app.dense``). It overrides
  ``transfer`` rather than ``build_teacher``.

None of them needs prototypes, and the teachers that are not distilled need no generators, so
clients are not asked for them; nor are they for ``dense``, whose generator is the server's.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
import torch
from flwr.common.logger import log
from torch import Tensor, nn

from common.data import generator_to_classifier_input
from common.models import Classifier
from server_app.dense import train_dense
from server_app.distill import DistillResult
from server_app.moe import ProbabilityMixture, label_share_weights
from server_app.strategy import MosaicStrategy


class _BaselineStrategy(MosaicStrategy):
    """Mosaic's schedule without prototypes; ``distilled = False`` also skips generators."""

    distilled = True

    def prototypes_expected(self, server_round: int) -> bool:
        return False

    def generator_signature(self, server_round: int) -> dict | None:
        return super().generator_signature(server_round) if self.distilled else None

    def builds_teacher_after(self, server_round: int) -> bool:
        """A teacher that is not distilled is judged once, at kd-round (``kd-every`` moves
        nothing for it)."""
        if self.distilled:
            return super().builds_teacher_after(server_round)
        return server_round == self.cfg.kd_round

    def transfer(
        self, student: Classifier, teacher: nn.Module, counts: np.ndarray
    ) -> DistillResult | None:
        """A teacher that is not distilled is the result: nothing to transfer, nothing to warn."""
        return super().transfer(student, teacher, counts) if self.distilled else None


class EnsembleStrategy(_BaselineStrategy):
    """The average of the client models' probabilities, reported as a teacher, not distilled."""

    distilled = False

    def build_teacher(
        self, states: list[dict[str, Tensor]], counts: np.ndarray
    ) -> tuple[nn.Module, dict[str, float]]:
        weights = torch.full(counts.shape, 1.0 / len(states))
        teacher = ProbabilityMixture(self.client_models(states), weights)
        return teacher.to(self.device).eval(), {}


class LabelShareStrategy(_BaselineStrategy):
    """Client probabilities weighted by their share of each class's samples; not distilled."""

    distilled = False

    def build_teacher(
        self, states: list[dict[str, Tensor]], counts: np.ndarray
    ) -> tuple[nn.Module, dict[str, float]]:
        teacher = ProbabilityMixture(self.client_models(states), label_share_weights(counts))
        return teacher.to(self.device).eval(), {}


class FedDFStrategy(EnsembleStrategy):
    """The ``ensemble`` teacher, distilled into the global model on generator samples."""

    distilled = True


class MosaicNoMetaStrategy(_BaselineStrategy):
    """Mosaic's teacher with an untrained meta model: its prior alone, distilled."""

    train_meta = False


class DenseStrategy(EnsembleStrategy):
    """The ``ensemble`` teacher, distilled on samples of a server-side generator (DENSE).

    Clients upload no generator; the server trains its own from scratch at the kd-round,
    alternating with the student (:func:`server_app.dense.train_dense`). Sizes come from the
    distillation keys (``kd-steps``, ``kd-lr``, ``kd-alpha``/``kd-beta``/``kd-temperature``; a
    batch is ``kd-batch-per-generator`` times the number of clients) and the generator's
    (``gen-lr``, ``gen-latent-dim``, ``gen-channels``); the weights of the generator loss are
    ``dense-lambda-bn`` and ``dense-lambda-adv``.
    """

    distilled = False  # as far as clients go: the generator is the server's own

    def transfer(
        self, student: Classifier, teacher: nn.Module, counts: np.ndarray
    ) -> DistillResult:
        if not isinstance(teacher, ProbabilityMixture):
            raise TypeError(f"DENSE needs the client ensemble as teacher, got {type(teacher)}")
        cfg = self.cfg
        clients = list(teacher.clients.members)
        return train_dense(
            student,
            teacher,
            clients,
            spec=self.generator_spec,
            num_classes=self.info.num_classes,
            classes=[int(c) for c in np.flatnonzero(np.asarray(counts).sum(axis=0) > 0)],
            to_input=lambda x: generator_to_classifier_input(x, self.info),
            steps=cfg.kd_steps,
            batch_size=max(2, cfg.kd_batch_per_generator * len(clients)),  # generator BN: 2+
            kd_lr=cfg.kd_lr,
            gen_lr=cfg.gen_lr,
            lambda_bn=cfg.dense_lambda_bn,
            lambda_adv=cfg.dense_lambda_adv,
            alpha=cfg.kd_alpha,
            beta=cfg.kd_beta,
            temperature=cfg.kd_temperature,
            device=self.device,
            seed=cfg.seed,
            progress=lambda line: log(INFO, "DENSE: %s", line),
        )


BASELINES: dict[str, type[MosaicStrategy]] = {
    "ensemble": EnsembleStrategy,
    "label-share": LabelShareStrategy,
    "feddf": FedDFStrategy,
    "mosaic-no-meta": MosaicNoMetaStrategy,
    "dense": DenseStrategy,
}
