"""What a client may not do inside the wire's rules: the server's checks on what it adopts.

``common.wire`` rejects replies that are malformed. A client can stay inside those rules and
still take a run over: claim another node's partition, change its label counts from one round
to the next, send an update a hundred times the size of everyone else's, or inflate its counts
to own the weighted averages; and an aggregate of well-formed replies can still compute NaN.
This module holds those checks as pure functions; the strategies call them
(``server_app.strategies.base``) and record the rule of every rejection.

Always on (they never fire on an honest run): partition ownership, unchanged label counts, a
finite aggregate. Options (``max-update-ratio``, ``max-weight-ratio``; 0 turns them off): they
bound a client against the round's median, which also moves honest outliers under strong skew.
``min-claim-agreement`` (0: off) checks label counts against the models themselves: the server
holds every client's classifier and generator, so a claimed class must be one the claimant's
model ranks above the other classes on the other clients' generated samples (:func:`claim_scores`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn


def update_norm(state: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]) -> float:
    """The L2 distance of a client's floating-point parameters from the model it was sent."""
    total = 0.0
    for key, tensor in state.items():
        if tensor.is_floating_point():
            total += float(torch.sum((tensor.double() - sent[key].double()) ** 2))
    return total**0.5


def above_median(values: Sequence[float], ratio: float) -> list[bool]:
    """Which ``values`` exceed ``ratio`` times their median (``ratio`` 0: none do)."""
    if ratio <= 0 or not values:
        return [False] * len(values)
    limit = ratio * float(np.median(values))
    return [value > limit for value in values]


def capped_sizes(sizes: Sequence[int], ratio: float) -> list[float]:
    """Each client's weight, at most ``ratio`` times the median weight (``ratio`` 0: as given).

    Keeps one client that claims a huge sample count from owning the weighted average (FedAvg,
    each expert, the label-share prior) while leaving every other weight as it was.
    """
    if ratio <= 0 or not sizes:
        return [float(size) for size in sizes]
    limit = ratio * float(np.median(sizes))
    return [float(min(size, limit)) for size in sizes]


def scale_counts(counts: np.ndarray, sizes: Sequence[float]) -> np.ndarray:
    """Label counts [clients, classes] scaled so that each row sums to its (capped) size."""
    totals = counts.sum(axis=1, keepdims=True).astype(np.float64)
    factors = np.divide(
        np.asarray(sizes, np.float64)[:, None], totals, out=np.ones_like(totals), where=totals > 0
    )
    return counts * np.minimum(factors, 1.0)


def partition_claims(
    claims: Iterable[tuple[int, int]], owners: Mapping[int, int], present: set[int]
) -> tuple[dict[int, int], set[int]]:
    """Who may answer for each partition this round, and the nodes that may not.

    ``claims`` are (node, partition) pairs of the round's replies; ``owners`` the node that
    answered for each partition before. An owner keeps its partition while it is ``present``
    (connected, sampled or not); a partition whose owner is gone (a restarted node gets a new
    id) goes to the lowest node id claiming it. Returns the owners after this
    round and the nodes whose claim is refused.
    """
    owners = dict(owners)
    claimants: dict[int, list[int]] = {}
    for node, partition in claims:
        claimants.setdefault(partition, []).append(node)
    refused = set()
    for partition, nodes in claimants.items():
        owner = owners.get(partition)
        if owner is None or owner not in present:
            owner = min(nodes)
            owners[partition] = owner
        refused |= {node for node in nodes if node != owner}
    return owners, refused


@torch.no_grad()
def computes_finite(model: nn.Module, probe: torch.Tensor) -> bool:
    """Whether ``model`` (eval mode) has finite weights and gives finite outputs on ``probe``;
    for a zoo of architectures (``common.architectures.ModelZoo``), every member's outputs."""
    if not all(
        torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()
    ):
        return False
    was_training = model.training
    model.eval()
    device = next((t.device for t in model.state_dict().values()), probe.device)
    runs = [model, *getattr(model, "members", {}).values()]
    try:
        return all(bool(torch.isfinite(run(probe.to(device))).all()) for run in runs)
    finally:
        model.train(was_training)


@torch.no_grad()
def claim_scores(
    outputs: Sequence[torch.Tensor],
    owners: Sequence[int],
    min_confidence: float = 0.9,
    min_samples: int = 4,
) -> np.ndarray:
    """How well each client model tells each class apart on the other clients' generated samples.

    ``outputs[g]`` is ``[n, K, C]``: the K client models' logits on generator ``g``'s n samples;
    ``owners[g]`` is the index among the K of the model whose client trained that generator (-1:
    none of them). The owner labels its generator's samples: a sample is of class c when the
    owner gives c a probability of at least ``min_confidence``. On one generator, model i's
    score for c is the area under its ROC curve for c: the chance that it gives a class-c
    sample a higher probability of c than a sample of another class (ties count half). A model
    that ranks the class well scores near 1 even if it knows only a few classes; one that
    cannot tell c from the rest scores 0.5 (calling everything c included), and one trained on
    wrong labels well under it. It needs ``min_samples`` of each. Returns ``[K, C]``: the best
    score over the generators of other owners (so neither a client's own generator nor one bad
    generator decides), NaN where no such generator gave enough samples.
    """
    if not outputs:
        raise ValueError("claim_scores needs the outputs on at least one generator")
    _, num_models, num_classes = outputs[0].shape
    best = np.full((num_models, num_classes), np.nan)
    for logits, owner in zip(outputs, owners, strict=True):
        if owner < 0:
            continue
        confidence, labels = logits[:, owner].float().softmax(-1).max(-1)
        labelled = confidence >= min_confidence
        labels = labels[labelled].cpu()
        probabilities = logits[labelled].float().softmax(-1).cpu()  # [n', K, C]
        score = np.full((num_models, num_classes), np.nan)
        for c in range(num_classes):
            positive = labels == c
            if positive.sum() < min_samples or (~positive).sum() < min_samples:
                continue
            p_c = probabilities[:, :, c]  # [n', K]
            above = p_c[positive][:, None, :] - p_c[~positive][None, :, :]  # [pos, neg, K]
            wins = (above > 0).double().mean((0, 1)) + 0.5 * (above == 0).double().mean((0, 1))
            score[:, c] = wins.numpy()
        score[owner] = np.nan  # a generator never vouches for its own client
        best = np.fmax(best, score)
    return best


def unsupported_claims(counts: np.ndarray, scores: np.ndarray, min_score: float) -> np.ndarray:
    """Which label-count claims ``[clients, classes]`` the models do not back: a positive count
    whose client scored under ``min_score`` on that class (:func:`claim_scores`). A claim
    nothing could check (NaN) stands, and so do all claims of a class whose every claimant
    failed: the evidence then says nothing about who holds it."""
    claimed = counts > 0
    refused = claimed & (scores < min_score)  # NaN compares False: unchecked claims stand
    nobody_left = ~(claimed & ~refused).any(axis=0)
    refused[:, nobody_left] = False
    return refused
