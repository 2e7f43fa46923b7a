"""Who trains which width: the ``width-tiers`` rule and a node's own ``width``.

``width-tiers = "1:4,0.5:3,0.25:3"`` reads "4 shares of clients at full width, 3 at half, 3 at a
quarter". With as many partitions as shares that is exactly 4/3/3; with N partitions the shares
are scaled to N (each tier keeps at least one client). Which partition gets which tier is a
seeded shuffle of the partition ids, so every run with the same seed and N agrees, and the
server never has to be told: each reply declares the width it trained. A SuperNode started with
``--node-config 'width=0.5 ...'`` trains at that rate instead (it must be a rate of the rule).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
Tiers = tuple[tuple[float, int], ...]  # (rate, share), in the order written
_SALT = 0x71E25  # the tier shuffle draws from its own stream, not the partitioning's


def parse_width_tiers(text: str) -> Tiers:
    """``"1:4,0.5:3"`` -> ((1.0, 4), (0.5, 3)); "" -> () (every client at full width).

    Raises ValueError with the reason (the config schema prefixes the key).
    """
    return parse_shares(text, _rate, "rate", "0.5:3")


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = float("nan")
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate {text!r} must be in (0, 1]")
    return rate


def parse_shares(
    text: str, value_of: Callable[[str], T], what: str, example: str
) -> tuple[tuple[T, int], ...]:
    """``"a:4,b:3"`` -> ((value_of("a"), 4), (value_of("b"), 3)); "" -> (). ``value_of``
    raises ValueError for a value the rule does not allow; a value listed twice, a share below 1
    or an item that is not ``<what>:clients`` is refused here."""
    if not text.strip():
        return ()
    rule = []
    for item in text.split(","):
        value_text, sep, share_text = item.strip().partition(":")
        try:
            share = int(share_text)
        except ValueError:
            raise ValueError(
                f"{item.strip()!r} is not '{what}:clients' (e.g. '{example}')"
            ) from None
        value = value_of(value_text.strip())
        if not sep or share < 1:
            raise ValueError(f"{value_text.strip()} needs at least 1 client, got {share}")
        rule.append((value, share))
    values = [value for value, _ in rule]
    if len(set(values)) != len(values):
        raise ValueError(f"a {what} is listed twice in {text!r}")
    return tuple(rule)


def tier_rates(tiers: Tiers) -> list[float]:
    """The rates a client may train at: those of the rule, or full width only."""
    return [rate for rate, _ in tiers] or [1.0]


def assign_widths(tiers: Tiers, num_partitions: int, seed: int) -> list[float]:
    """The rate of every partition id under the rule (all 1.0 without one)."""
    if not tiers:
        return [1.0] * num_partitions
    return assign_shares(tiers, num_partitions, seed, "width-tiers", "tiers", _SALT)


def assign_shares(
    shares: Sequence[tuple[T, int]],
    num_partitions: int,
    seed: int,
    key: str,
    what: str,
    salt: int,
) -> list[T]:
    """Deal ``(value, share)`` pairs out to ``num_partitions`` partition ids: the shares scaled
    to the partition count (each value keeps at least one partition, largest remainders get
    the rest), then a seeded shuffle of the ids. ``key`` and ``what`` ("tiers") word errors."""
    if num_partitions < len(shares):
        raise ValueError(
            f"{key}: {len(shares)} {what} need at least as many clients, there are {num_partitions}"
        )
    weights = np.array([share for _, share in shares], dtype=float)
    counts = np.maximum(1, np.floor(weights / weights.sum() * num_partitions)).astype(int)
    while counts.sum() > num_partitions:  # the floor of 1 overshot: take from the largest
        counts[np.argmax(counts)] -= 1
    order = np.argsort(-(weights / weights.sum() * num_partitions - counts), kind="stable")
    for index in order[: num_partitions - counts.sum()]:  # largest remainders first
        counts[index] += 1
    ladder = [value for (value, _), count in zip(shares, counts, strict=True) for _ in range(count)]
    order = np.random.default_rng([seed, salt]).permutation(num_partitions)
    values: list[T] = [ladder[0]] * num_partitions
    for position, partition in enumerate(order):
        values[int(partition)] = ladder[position]
    return values


def node_width(
    tiers: Tiers, node_config: Mapping[str, Any], partition_id: int, num_partitions: int, seed: int
) -> float:
    """This node's rate: ``width`` from its node config if set (a rate of the rule), else the
    rule's rate for its partition."""
    if "width" in node_config:
        try:
            rate = float(node_config["width"])
        except (TypeError, ValueError):
            rate = float("nan")
        if rate not in tier_rates(tiers):
            raise ValueError(
                f"node config width={node_config['width']!r} is not a rate of width-tiers "
                f"(allowed: {tier_rates(tiers)})"
            )
        return rate
    return assign_widths(tiers, num_partitions, seed)[partition_id]
