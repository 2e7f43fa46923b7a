"""Mixture of per-class experts, the label-share prior and the prototype bank.

Expert ``c`` is the average of the client models weighted by how many samples of class ``c``
each client holds, so under label skew it is dominated by the clients that actually saw ``c``.
:class:`ExpertEnsemble` runs the experts (or the client models themselves) side by side.

Averaging parameters loses much of what each client learnt, while the client models' own
probabilities, weighted by each client's share of a class (:func:`label_share_weights`), make a
strong teacher from the label counts alone (:class:`ProbabilityMixture`). Mosaic's meta model
starts from that mixture as its prior and learns from the experts how to correct it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from common.models import Classifier
from common.submodels import average_covered


def build_experts(
    client_states: Sequence[Mapping[str, Tensor]],
    label_counts: np.ndarray | Tensor,
    *,
    masks: Sequence[Mapping[str, Tensor]] | None = None,
    fallback: Mapping[str, Tensor] | None = None,
) -> dict[int, dict[str, Tensor]]:
    """Average the client models once per class, weighted by each client's count of that class.

    ``expert_c = sum_k n_kc * w_k / sum_k n_kc`` for every floating tensor, BatchNorm running
    statistics included (they describe the data the weights were fitted on, so they follow the
    same weights). Integer tensors (``num_batches_tracked``) cannot be averaged; they take the
    maximum over the clients that hold the class.

    Parameters
    ----------
    client_states
        One state dict per client, all of the same architecture.
    label_counts
        ``[num_clients, num_classes]`` non-negative sample counts per client and class.
    masks, fallback
        With width sub-models (``common.submodels``): per client, the coordinates it trained.
        Each coordinate of expert ``c`` is then averaged over the holders of ``c`` that trained
        it, and is ``fallback``'s (the global model's) where none did, never zero.

    Returns
    -------
    dict[int, dict[str, Tensor]]
        Class id -> expert state dict. Classes no client holds get no expert: an average with
        all-zero weights is undefined, and a random expert would only add noise to the teacher.

    Raises
    ------
    ValueError
        If the states disagree on keys or shapes, or the counts do not fit the clients.
    """
    counts = torch.as_tensor(np.asarray(label_counts), dtype=torch.float64)
    if counts.ndim != 2 or counts.shape[0] != len(client_states) or len(client_states) == 0:
        raise ValueError(
            f"label_counts must be [num_clients={len(client_states)}, num_classes] and non-empty,"
            f" got shape {tuple(counts.shape)}"
        )
    if (counts < 0).any():
        raise ValueError("label_counts must be non-negative")
    reference = client_states[0]
    for index, state in enumerate(client_states[1:], start=1):
        if state.keys() != reference.keys():
            raise ValueError(f"client {index} has different state keys than client 0")
        for name, tensor in state.items():
            if tensor.shape != reference[name].shape:
                raise ValueError(
                    f"client {index} {name!r} has shape {tuple(tensor.shape)},"
                    f" client 0 has {tuple(reference[name].shape)}"
                )

    totals = counts.sum(dim=0)
    classes = [c for c in range(counts.shape[1]) if totals[c] > 0]
    if masks is not None:
        if fallback is None or len(masks) != len(client_states):
            raise ValueError("masks need one entry per client and a fallback state")
        return {
            c: average_covered(client_states, masks, counts[:, c].tolist(), fallback)
            for c in classes
        }
    weights = counts[:, classes] / totals[classes]  # [clients, experts], columns sum to 1
    experts: dict[int, dict[str, Tensor]] = {c: {} for c in classes}
    for name, ref in reference.items():
        stacked = torch.stack([state[name].to(ref.device) for state in client_states])
        if ref.is_floating_point():
            w = weights.T.to(ref.device)
            per_class = torch.tensordot(w, stacked.to(torch.float64), dims=1).to(ref.dtype)
        else:
            holders = (weights > 0).T.to(ref.device)
            per_class = torch.stack([stacked[mask].amax(dim=0) for mask in holders])
        for column, c in enumerate(classes):
            experts[c][name] = per_class[column]
    return experts


class ExpertEnsemble(nn.Module):
    """All experts of one architecture, evaluated together in eval mode (BN on running stats).

    The experts are plain copies of the template run one after another. ``torch.func``'s
    ``vmap`` over ``functional_call`` was tried first and measured 7x slower on the CPU here
    (2,560 FashionMNIST images through 10 SmallCNN experts: 15.3 s against 2.3 s), because the
    batched convolution loses the channels-last kernels; a loop of E small models is also what
    one reads most easily. The ensemble is a frozen teacher: no parameter requires grad.
    """

    def __init__(self, template: Classifier, experts: Mapping[int, Mapping[str, Tensor]]) -> None:
        super().__init__()
        if not experts:
            raise ValueError("an ensemble needs at least one expert")
        self.expert_classes: list[int] = sorted(experts)
        members = []
        for c in self.expert_classes:
            member = copy.deepcopy(template)
            member.load_state_dict(experts[c])
            members.append(member.eval().requires_grad_(False))
        self.members = nn.ModuleList(members)

    @property
    def num_experts(self) -> int:
        return len(self.expert_classes)

    def train(self, mode: bool = True) -> ExpertEnsemble:
        """Stay in eval mode: experts always use their averaged BatchNorm statistics."""
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        """Run every full expert on images ``[B, ...]``; returns logits ``[B, E, C]``."""
        return torch.stack([member(x) for member in self.members], dim=1)

    def heads(self, features: Tensor) -> Tensor:
        """Apply only each expert's head to penultimate features ``[B, d]``; ``[B, E, C]``.

        This is how prototypes (feature-space centres) are scored: they live after the body.
        """
        return torch.stack([member.head(features) for member in self.members], dim=1)


class ProbabilityMixture(nn.Module):
    """``log sum_k w_kc p_k(c | x)`` over client models ``k``: a frozen teacher.

    ``weights`` is ``[num_clients, num_classes]``; the output is a log-probability up to a
    per-sample constant (softmax and argmax read it as logits). Classes with zero weight from
    every client get ``log(1e-12)``.
    """

    def __init__(self, clients: ExpertEnsemble, weights: Tensor) -> None:
        super().__init__()
        if weights.shape[0] != clients.num_experts:
            raise ValueError(
                f"weights has {weights.shape[0]} rows for {clients.num_experts} client models"
            )
        self.clients = clients
        self.register_buffer("weights", weights.float())

    def forward(self, x: Tensor) -> Tensor:
        """Log-mixture on images ``[B, ...]``: every client model runs in full."""
        return self.mix(self.clients(x))

    def heads(self, features: Tensor) -> Tensor:
        """Log-mixture on penultimate features ``[B, d]`` (prototypes): heads only."""
        return self.mix(self.clients.heads(features))

    def mix(self, client_logits: Tensor) -> Tensor:
        """``[B, K, C]`` client logits -> ``[B, C]`` log of the weighted probability mixture."""
        probabilities = client_logits.softmax(dim=-1)
        return (probabilities * self.weights).sum(dim=1).clamp_min(1e-12).log()


def label_share_weights(counts: np.ndarray) -> Tensor:
    """``n_kc / n_c`` per client ``k`` and class ``c``; zero for classes no client holds."""
    counts = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    totals = counts.sum(dim=0, keepdim=True)
    return torch.where(totals > 0, counts / totals.clamp_min(1), 0.0)


def strongest_holders(counts: np.ndarray, limit: int) -> list[int]:
    """The clients a label-share mixture keeps when it may run at most ``limit`` client models
    (``meta-prior-clients``; 0, or no more clients than ``limit``: every client), in order.

    Read in full, the mixture runs every client model on every sample it labels, so its cost
    grows with the clients. Kept first: each class's largest holder (classes from the largest),
    so every class keeps its main witness; then the clients with the largest summed share
    ``sum_c n_kc / n_c``. The mixture renormalises each class over the kept clients.
    """
    counts = np.asarray(counts)
    if limit <= 0 or len(counts) <= limit:
        return list(range(len(counts)))
    shares = label_share_weights(counts).numpy()
    chosen: list[int] = []
    for cls in np.argsort(-counts.sum(axis=0), kind="stable"):
        holder = int(np.argmax(shares[:, cls]))
        if counts[:, cls].sum() > 0 and holder not in chosen and len(chosen) < limit:
            chosen.append(holder)
    for client in np.argsort(-shares.sum(axis=1), kind="stable"):
        if len(chosen) < limit and int(client) not in chosen:
            chosen.append(int(client))
    return sorted(chosen)


class PrototypeBank:
    """Class prototypes from the last ``max_rounds`` distinct rounds (several clients a round).

    Older rounds are dropped because they were computed with older global models, whose
    feature space has drifted from the heads the experts now apply. Prototypes are kept on the
    CPU as float32; move them where they are used. The window is the ``max_rounds`` highest
    round numbers seen, so a late add for a round already outside it is dropped at once.
    """

    def __init__(self, max_rounds: int) -> None:
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
        self.max_rounds = max_rounds
        self._entries: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self._feature_dim: int | None = None

    def add(self, server_round: int, features: Tensor, classes: Tensor) -> None:
        """Add ``features [n, d]`` with their ``classes [n]``; evict rounds beyond the window."""
        if features.ndim != 2 or classes.ndim != 1 or features.shape[0] != classes.shape[0]:
            raise ValueError(
                f"expected features [n, d] and classes [n], got {tuple(features.shape)}"
                f" and {tuple(classes.shape)}"
            )
        if self._feature_dim is not None and features.shape[1] != self._feature_dim:
            raise ValueError(
                f"feature dim {features.shape[1]} differs from the bank's {self._feature_dim}"
            )
        if features.shape[0] == 0:
            return
        self._feature_dim = features.shape[1]
        entry = (
            features.detach().to("cpu", torch.float32),
            classes.detach().to("cpu", torch.int64),
        )
        self._entries.setdefault(server_round, []).append(entry)
        for old_round in sorted(self._entries)[: -self.max_rounds]:
            del self._entries[old_round]

    @property
    def rounds(self) -> list[int]:
        """The rounds currently kept, oldest first."""
        return sorted(self._entries)

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All kept prototypes: features ``[N, d]`` float32 and classes ``[N]`` int64."""
        entries = [entry for r in self.rounds for entry in self._entries[r]]
        if not entries:
            return torch.empty(0, self._feature_dim or 0), torch.empty(0, dtype=torch.int64)
        return torch.cat([f for f, _ in entries]), torch.cat([c for _, c in entries])

    def __len__(self) -> int:
        return sum(f.shape[0] for entries in self._entries.values() for f, _ in entries)

    def state_dict(self) -> dict[int, list[dict[str, Tensor]]]:
        """The kept prototypes per round as plain data, for checkpoints."""
        return {
            r: [{"features": f, "classes": c} for f, c in self._entries[r]] for r in self.rounds
        }

    def load_state_dict(self, state: Mapping[int, Sequence[Mapping[str, Tensor]]]) -> None:
        """Replace the bank's content with what :meth:`state_dict` returned."""
        self._entries.clear()
        self._feature_dim = None
        for server_round, entries in sorted(state.items()):
            for entry in entries:
                self.add(server_round, entry["features"], entry["classes"])
