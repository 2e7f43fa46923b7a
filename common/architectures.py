"""Federations of mixed architectures: who runs which model, and the server's model of them all.

``architectures = "cnn:4,resnet8:3,mlp:3"`` reads "4 shares of clients run the CNN, 3 a
ResNet-8, 3 an MLP", dealt out to the partitions as ``width-tiers`` are (``common.tiers``: shares
scaled to the client count, a seeded shuffle of the partition ids). A SuperNode started with
``--node-config 'arch="mlp"'`` runs that architecture instead (it must be one of the rule's).

The parameters of different families can never be averaged, so the server's global model is a
:class:`ModelZoo`: one model per architecture side by side, and a ``mix`` buffer saying how the
zoo's output combines them. :class:`ArchitectureSlicer` gives the zoo the interface of the width
slicer (``common.submodels.WidthSlicer``): a client's sub-model is its architecture's member, and
embedding a member writes it into the zoo with ``mix`` one-hot on its architecture and marks
those coordinates as covered. The per-coordinate average width tiers already use then does the
rest, with nothing specific to architectures downstream:

- FedAvg over the covered coordinates is FedAvg within each architecture group; a member no
  client of a round ran keeps its value.
- The class-``c`` expert (``server_app.moe.build_experts``, weights ``n_kc``) is every group's
  class-``c`` expert, and its averaged ``mix`` is each group's share of class ``c``: the experts
  mixed across groups by share. With one architecture this is the usual expert; with one client
  per group, the label-share mixture.
- A client model padded into a zoo (``mix`` one-hot) runs only its own member, so the label-share
  prior and the ensembles read every client model as it is.

The global zoo's ``mix`` is one-hot on the run's ``model`` (:meth:`ArchitectureSlicer.
global_state`): the global model evaluates, and is distilled, as that architecture, the
student; with ``kd-sub-models`` every other member is distilled from the same teacher too, so
every client can download a model it runs (FedDF's one model per architecture).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from common.data import dataset_info
from common.models import Classifier, ImageShape, build_classifier, classifier_names
from common.tiers import assign_shares, parse_shares

if TYPE_CHECKING:  # the config schema imports this module for its rule
    from common.config import RunConfig

Architectures = tuple[tuple[str, int], ...]  # (classifier name, share), in the order written
_SALT = 0xA2C4  # the architecture shuffle draws from its own stream
MIX = "mix"  # the zoo's buffer of member weights
State = dict[str, Tensor]


def parse_architectures(text: str) -> Architectures:
    """``"cnn:4,mlp:3"`` -> (("cnn", 4), ("mlp", 3)); "" -> () (every client runs ``model``).

    Raises ValueError with the reason (the config schema prefixes the key).
    """
    rule = parse_shares(text, _known_classifier, "model", "mlp:3")
    if len(rule) == 1:
        raise ValueError(f"{text!r} names one architecture: set model instead")
    return rule


def _known_classifier(name: str) -> str:
    if name not in classifier_names():
        raise ValueError(f"{name!r} is not one of {classifier_names()}")
    return name


def assign_architectures(rule: Architectures, num_partitions: int, seed: int) -> list[str]:
    """The architecture of every partition id under the rule."""
    return assign_shares(rule, num_partitions, seed, "architectures", "architectures", _SALT)


def node_architecture(
    rule: Architectures,
    node_config: Mapping[str, Any],
    partition_id: int,
    num_partitions: int | None,
    seed: int,
) -> str:
    """This node's architecture: ``arch`` from its node config if set (one of the rule's),
    else the rule's for its partition. A node with no partition count (its own data) has no
    place in the rule and must name one."""
    names = [name for name, _ in rule]
    if "arch" in node_config:
        if node_config["arch"] not in names:
            raise ValueError(
                f"node config arch={node_config['arch']!r} is not an architecture of the run's "
                f"architectures (allowed: {names})"
            )
        return str(node_config["arch"])
    if num_partitions is None:
        raise ValueError(
            "architectures is set and this node (data-dir, no num-partitions) has no place in "
            'its rule: add arch="<name>" to its --node-config'
        )
    return assign_architectures(rule, num_partitions, seed)[partition_id]


class ModelZoo(Classifier):
    """One classifier per architecture side by side, combined by the ``mix`` buffer.

    The output is ``log sum_g mix_g softmax(member_g(x))`` over the members with a positive
    weight; with one such member, that member's own logits (which is what a client model padded
    into a zoo, and the global model, compute). A zoo has no single feature space, so it has no
    ``features``: prototypes are taken under a member.
    """

    feature_dim = 0

    def __init__(
        self,
        names: Sequence[str],
        *,
        num_classes: int,
        in_shape: ImageShape,
        width: float = 1.0,
        active: str | None = None,
    ) -> None:
        super().__init__()
        self.names = tuple(names)
        self.members = nn.ModuleDict(
            {
                name: build_classifier(
                    name, num_classes=num_classes, in_shape=in_shape, width=width
                )
                for name in self.names
            }
        )
        self.register_buffer(MIX, one_hot(self.names, active or self.names[0]))

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError("a model zoo has no single feature space; use a member's")

    def forward(self, x: Tensor) -> Tensor:
        weights = [
            (name, w) for name, w in zip(self.names, self.mix.tolist(), strict=True) if w > 0
        ]
        if not weights:
            raise ValueError("the zoo's mix weighs no member")
        if len(weights) == 1:
            return self.members[weights[0][0]](x)
        mixture = sum(w * self.members[name](x).softmax(dim=-1) for name, w in weights)
        return mixture.clamp_min(1e-12).log()


def build_global_model(
    model: str, rule: Architectures, *, num_classes: int, in_shape: ImageShape, width: float = 1.0
) -> Classifier:
    """The server's global model: classifier ``model``, or with a rule of architectures a zoo
    of them all whose output is ``model``'s (the student)."""
    if not rule:
        return build_classifier(model, num_classes=num_classes, in_shape=in_shape, width=width)
    names = [name for name, _ in rule]
    return ModelZoo(names, num_classes=num_classes, in_shape=in_shape, width=width, active=model)


def global_model_of(cfg: RunConfig) -> Classifier:
    """The server's global model for a run config (:func:`build_global_model` of its keys)."""
    info = dataset_info(cfg.dataset)
    return build_global_model(
        cfg.model,
        cfg.architecture_rule,
        num_classes=info.num_classes,
        in_shape=info.image_shape,
        width=cfg.model_width,
    )


def one_hot(names: Sequence[str], name: str) -> Tensor:
    """The ``mix`` of a zoo that runs only ``name``."""
    return torch.tensor([1.0 if n == name else 0.0 for n in names])


class ArchitectureSlicer:
    """The members of a :class:`ModelZoo` as the sub-models of a global model (the interface of
    ``common.submodels.WidthSlicer``, keyed by architecture name instead of rate)."""

    def __init__(
        self,
        names: Sequence[str],
        student: str,
        *,
        num_classes: int,
        in_shape: ImageShape,
        model_width: float = 1.0,
    ) -> None:
        if student not in names:
            raise ValueError(f"the student {student!r} is not one of the architectures {names}")
        self.names = tuple(names)
        self.student = student
        self.full = ModelZoo(
            names, num_classes=num_classes, in_shape=in_shape, width=model_width, active=student
        )

    def template(self, name: str) -> Classifier:
        """The architecture a client running ``name`` trains (copy before use)."""
        return self.full.members[name]

    def window_start(self, server_round: int) -> int:
        """Members are whole models: there is no window to move."""
        return 0

    def slice(self, state: Mapping[str, Tensor], name: str, start: int = 0) -> State:
        """Member ``name``'s state out of a zoo's."""
        prefix = f"members.{name}."
        return {key[len(prefix) :]: t.clone() for key, t in state.items() if key.startswith(prefix)}

    def embed(
        self, sub_state: Mapping[str, Tensor], name: str, start: int, base: Mapping[str, Tensor]
    ) -> tuple[State, dict[str, Tensor]]:
        """``base`` with member ``name`` replaced by ``sub_state`` and ``mix`` one-hot on it, and
        per key a bool mask of the coordinates that member (and ``mix``) covers."""
        prefix = f"members.{name}."
        states = {key: tensor.clone() for key, tensor in base.items()}
        masks = {
            key: torch.zeros(t.shape, dtype=torch.bool, device=t.device) for key, t in base.items()
        }
        for key, tensor in sub_state.items():
            full = states[prefix + key]
            states[prefix + key] = tensor.to(full.device, full.dtype).clone()
            masks[prefix + key] = torch.ones(full.shape, dtype=torch.bool, device=full.device)
        states[MIX] = one_hot(self.names, name).to(base[MIX].device)
        masks[MIX] = torch.ones(len(self.names), dtype=torch.bool, device=base[MIX].device)
        return states, masks

    def padded(self, sub_state: Mapping[str, Tensor], name: str, start: int = 0) -> State:
        """Member ``name`` as a zoo that computes exactly what it computes (the others zero)."""
        zeros = {key: torch.zeros_like(tensor) for key, tensor in self.full.state_dict().items()}
        return self.embed(sub_state, name, start, zeros)[0]

    def global_state(self, state: Mapping[str, Tensor]) -> State:
        """A round's average as the global model: ``mix`` one-hot on the student, so the global
        model is evaluated and distilled as that architecture."""
        return {**state, MIX: one_hot(self.names, self.student).to(state[MIX].device)}
