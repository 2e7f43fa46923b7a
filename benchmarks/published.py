"""Published one-shot numbers beside ours, per alpha, marked as published.

The published figures are the DENSE paper's Table 1 (one-shot, 5 clients). They come from
another CNN, other local epochs and other splits, so they orient rather than compare
one-to-one; the table says so. Ours are the mean over the seeds recorded, of the same records
(and the same accuracy per method) as the suite's own table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Record = Mapping[str, Any]

ALPHAS = (0.1, 0.3, 0.5)
# dataset -> method -> accuracy in % at ALPHAS (None: not published).
PUBLISHED: dict[str, dict[str, tuple[float | None, ...]]] = {
    "fashion-mnist": {
        "fedavg": (41.69, 82.96, 83.72),
        "dense": (50.29, 83.96, 85.94),
        "ensemble": (67.71, 87.25, 89.42),
    },
    "mnist": {
        "fedavg": (48.24, 72.94, 90.55),
        "feddf": (60.15, 74.01, 92.18),
        "dense": (66.61, 76.48, 95.82),
        "ensemble": (86.81, None, None),
    },
}
ROWS = {
    "fedavg": "FedAvg (one-shot)",
    "feddf": "FedDF",
    "dense": "DENSE",
    "ensemble": "ensemble of local models",
    "label-share": "label-share ensemble (teacher)",
    "mosaic": "Mosaic",
}
TITLES = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


def _ours(
    records: Sequence[Record],
    dataset: str,
    alpha: float,
    strategy: str,
    accuracy: Callable[[Record], float | None],
) -> str:
    values = [
        accuracy(r)
        for r in records
        if r.get("status") == "ok"
        and r["cell"]["protocol"] == "one-shot"
        and r["cell"]["num_clients"] == 5
        and r["cell"]["dataset"] == dataset
        and r["cell"]["alpha"] == alpha
        and r["cell"]["strategy"] == strategy
    ]
    values = [v for v in values if v is not None]
    if not values:
        return "not run"
    return f"{100 * float(np.mean(values)):.2f} ({len(values)} seed{'s' * (len(values) > 1)})"


def render_published(records: Sequence[Record], accuracy: Callable[[Record], float | None]) -> str:
    """Markdown, one table per dataset with one-shot 5-client records; "" when there are none."""
    datasets = [
        d
        for d in PUBLISHED
        if any(
            r["cell"]["protocol"] == "one-shot"
            and r["cell"]["num_clients"] == 5
            and r["cell"]["dataset"] == d
            for r in records
        )
    ]
    if not datasets:
        return ""
    lines = [
        "## Published numbers beside ours (one-shot, 5 clients)",
        "",
        "*Published*: the DENSE paper's Table 1, another CNN, other local epochs and splits, so"
        " not comparable one-to-one. *Ours*: the method's accuracy as in the tables below, mean"
        " over the seeds recorded.",
    ]
    header = " | ".join(f"a={a} published | a={a} ours" for a in ALPHAS)
    for dataset in datasets:
        lines += ["", f"{TITLES[dataset]}:", "", f"| method | {header} |"]
        lines.append("|---|" + "---|" * (2 * len(ALPHAS)))
        for strategy, name in ROWS.items():
            published = PUBLISHED[dataset].get(strategy, (None,) * len(ALPHAS))
            cells = []
            for alpha, value in zip(ALPHAS, published, strict=True):
                cells.append("-" if value is None else f"{value:.2f} (published)")
                cells.append(_ours(records, dataset, alpha, strategy, accuracy))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
