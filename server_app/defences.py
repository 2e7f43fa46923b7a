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
    """Whether ``model`` (eval mode) has finite weights and gives finite outputs on ``probe``."""
    if not all(
        torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()
    ):
        return False
    was_training = model.training
    model.eval()
    device = next((t.device for t in model.state_dict().values()), probe.device)
    try:
        return bool(torch.isfinite(model(probe.to(device))).all())
    finally:
        model.train(was_training)
