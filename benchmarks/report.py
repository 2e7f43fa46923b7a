"""What the records say: the Markdown table (with the targets and the published numbers) and
the two charts, all made from cell records alone, so any clone regenerates them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.published import render_published
from benchmarks.suites import ALL_STRATEGIES, TEACHER_ONLY, Cell
from benchmarks.targets import render_standing, render_targets


def method_accuracy(record: Mapping[str, Any]) -> float | None:
    """The accuracy a method is judged by: its teacher if never distilled, else the model's."""
    if record.get("status") != "ok":
        return None
    if record["cell"]["strategy"] in TEACHER_ONLY:
        return record.get("teacher_accuracy")
    return record.get("final_accuracy")


def _mean_std(values: Sequence[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    mean = 100 * float(np.mean(present))
    if len(present) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * float(np.std(present, ddof=1)):.2f}"


def _replies_reused(records: Sequence[Mapping[str, Any]]) -> str:
    """``reused/all`` client replies over ``records``; ``-`` where none counted them."""
    counted = [r["client_replies"] for r in records if "client_replies" in r]
    if not counted:
        return "-"
    reused = sum(c["reused"] for c in counted)
    text = f"{reused}/{reused + sum(c['computed'] for c in counted)}"
    if len(counted) < len(records):  # records made before the cache existed do not count
        text += f" ({len(counted)} of {len(records)} seeds)"
    return text


def _megabytes(values: Sequence[float | None]) -> str:
    """The mean of byte counts in MiB, or "-" when there are none."""
    counted = [v / 2**20 for v in values if v is not None]
    return f"{np.mean(counted):.2f}" if counted else "-"


def _by_setting(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list]]:
    table: dict[str, dict[str, list]] = {}
    for record in records:
        cell = Cell(**record["cell"])
        table.setdefault(cell.setting, {}).setdefault(cell.method, []).append(record)
    return table


def _split_note(records: Sequence[Mapping[str, Any]]) -> str:
    """Which seed split the data: each run's own (``partition-seed`` -1, the default) or a
    fixed one, so that a reader knows whether the spread over seeds includes the split's."""
    fixed = sorted(
        {int(r["config"].get("partition-seed", -1)) for r in records if "config" in r} - {-1}
    )
    if not fixed:
        return "Each seed also draws its own data split (`partition-seed` follows `seed`)."
    return f"The data split is fixed by `partition-seed` {', '.join(map(str, fixed))} in some runs."


def render_table(records: Sequence[Mapping[str, Any]], suite_name: str = "") -> str:
    """Markdown: per setting, one row per method (mean ± std over seeds, in %)."""
    lines = [f"# Benchmark results{f' ({suite_name} suite)' if suite_name else ''}", ""]
    lines.append(
        "Accuracy in % on the test set, mean ± std over seeds. *Method* is the global model's "
        "final accuracy, except for the teachers that are not distilled (ensemble, label-share), "
        "judged by their teacher accuracy at the kd-round. Wall time is the whole run, less the "
        "client work a cell reused from another (*replies reused*: client replies taken from "
        "the reply cache, of all the cells' replies; a reused reply is the one the client "
        "would send again). Uplink is the mean total bytes a client sent over the run. "
        + _split_note(records)
    )
    if suite_name:
        lines += ["", render_targets(records, suite_name, method_accuracy, TEACHER_ONLY).rstrip()]
    standing = render_standing(records, method_accuracy, TEACHER_ONLY)
    if standing:
        lines += ["", standing.rstrip()]
    published = render_published(records, method_accuracy)
    if published:
        lines += ["", published.rstrip()]
    for setting, methods in _by_setting(records).items():
        lines += ["", f"## {setting}", ""]
        group_records = [r for group in methods.values() for r in group]
        widths = sorted(
            {w for r in group_records for w in r.get("sub_model_accuracy") or {}},
            key=float,
            reverse=True,
        )
        archs = sorted({a for r in group_records for a in r.get("arch_accuracy") or {}})
        tier_columns = [f"width {w} sub-model" for w in widths]
        tier_columns += [f"{a} model" for a in archs]
        tier_columns += ["downlink MB/client"] if widths or archs else []
        header = [
            "method",
            "seeds",
            "method acc",
            "global model",
            *tier_columns,
            "teacher",
            "pre-KD",
            "post-KD",
            "wall s",
            "replies reused",
            "uplink MB/client",
            "crashed",
        ]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for method, group in methods.items():
            ok = [r for r in group if r.get("status") == "ok"]
            crashed = [r for r in group if r.get("status") != "ok"]
            walls = [r["wall_seconds"] for r in ok]
            tier_values = [
                _mean_std([(r.get("sub_model_accuracy") or {}).get(w) for r in ok]) for w in widths
            ]
            tier_values += [
                _mean_std([(r.get("arch_accuracy") or {}).get(a) for r in ok]) for a in archs
            ]
            if widths or archs:
                tier_values.append(_megabytes([r["bytes_per_client"].get("downlink") for r in ok]))
            lines.append(
                "| "
                + " | ".join(
                    [
                        method,
                        str(len(ok)),
                        _mean_std([method_accuracy(r) for r in ok]),
                        _mean_std([r.get("final_accuracy") for r in ok]),
                        *tier_values,
                        _mean_std([r.get("teacher_accuracy") for r in ok]),
                        _mean_std([r.get("pre_kd_accuracy") for r in ok]),
                        _mean_std([r.get("post_kd_accuracy") for r in ok]),
                        f"{np.mean(walls):.0f}" if walls else "-",
                        _replies_reused(ok),
                        _megabytes([r["bytes_per_client"].get("uplink") for r in ok]),
                        "; ".join(f"seed {r['cell']['seed']}: {r['error']}" for r in crashed)
                        or "0",
                    ]
                )
                + " |"
            )
        # One split per seed (every method of a seed shares it): its counts, once per seed.
        per_seed: dict[int, dict[str, list[int]]] = {}
        for group in methods.values():
            for r in group:
                if r.get("label_counts"):
                    per_seed.setdefault(r["cell"]["seed"], r["label_counts"])
        for seed, label_counts in sorted(per_seed.items()):
            lines += ["", f"Per-client label counts, seed {seed}:", ""]
            lines += [f"- {client}: {counts}" for client, counts in label_counts.items()]
    return "\n".join(lines) + "\n"


def write_table(records: Sequence[Mapping[str, Any]], path: Path, suite_name: str = "") -> Path:
    path.write_text(render_table(records, suite_name))
    return path


GENERATED_END = "<!-- end generated -->"


def generated_marker(source: str) -> str:
    """The line that opens a block of a document copied from the generated file ``source``."""
    return f"<!-- generated: {source} -->"


def refresh_generated_block(document: Path, table: Path, source: str) -> bool:
    """Copy ``table`` into ``document`` between ``generated_marker(source)`` and
    :data:`GENERATED_END`, its title dropped and every heading one level down, so the copy
    reads as a section of the document. Returns whether ``document`` changed.

    The docs quote the generated table rather than link it so a reader of the docs sees the
    numbers beside their history; refreshing it whenever the harness writes the table keeps the
    quote from drifting. A document without the marker is left alone; a marker without its end
    is an error (``ValueError``), never an overwrite of everything after it.
    """
    if not document.exists():
        return False
    text = document.read_text()
    begin = generated_marker(source)
    start = text.find(begin)
    if start < 0:
        return False
    body_start = text.index("\n", start) + 1
    end = text.find(GENERATED_END, body_start)
    if end < 0:
        raise ValueError(f"{document}: {begin!r} has no {GENERATED_END!r} after it")
    lines = table.read_text().splitlines()
    if lines and lines[0].startswith("# "):  # the title: the document's section names it
        lines = lines[1:]
    while lines and not lines[0].strip():
        lines = lines[1:]
    body = "".join(f"#{line}\n" if line.startswith("#") else f"{line}\n" for line in lines)
    updated = text[:body_start] + body + text[end:]
    if updated == text:
        return False
    document.write_text(updated)
    return True


def write_bar_chart(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """One group of bars per setting, one bar per method (mean, std as error bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = _by_setting(records)
    present = {s for methods in table.values() for s in methods}
    strategies = [s for s in ALL_STRATEGIES if s in present] + sorted(present - {*ALL_STRATEGIES})
    fig, ax = plt.subplots(figsize=(max(6, 2 + 1.5 * len(table) * len(strategies) / 3), 4))
    width = 0.8 / max(len(strategies), 1)
    for offset, strategy in enumerate(strategies):
        means, stds = [], []
        for methods in table.values():
            values = [method_accuracy(r) for r in methods.get(strategy, [])]
            values = [100 * v for v in values if v is not None]
            means.append(float(np.mean(values)) if values else 0.0)
            stds.append(float(np.std(values)) if len(values) > 1 else 0.0)
        positions = np.arange(len(table)) + offset * width
        ax.bar(positions, means, width, yerr=stds, label=strategy)
    ax.set_xticks(np.arange(len(table)) + width * (len(strategies) - 1) / 2)
    ax.set_xticklabels([s.replace(" alpha", "\nalpha") for s in table], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_round_plot(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Test accuracy of the global model per round, one panel per multi-round setting, one
    line per method (mean over seeds; round 0 is the initial model). One-shot settings (a
    single round) have no curve to show; with no other setting they get panels all the same."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves_by_setting = {
        setting: {strategy: _mean_curve(group) for strategy, group in methods.items()}
        for setting, methods in _by_setting(records).items()
    }
    multi = {s: c for s, c in curves_by_setting.items() if any(len(v) > 2 for v in c.values())}
    panels = multi or curves_by_setting
    fig, axes = plt.subplots(
        1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 3.5), squeeze=False
    )
    for ax, (setting, curves) in zip(axes[0], panels.items(), strict=False):
        for strategy in [*ALL_STRATEGIES, *sorted(set(curves) - {*ALL_STRATEGIES})]:
            if curves.get(strategy):
                rounds, accuracy = zip(*sorted(curves[strategy].items()), strict=True)
                ax.plot(rounds, accuracy, marker="o", markersize=3, label=strategy)
        ax.set_title(setting, fontsize=8)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _mean_curve(cell_records: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Accuracy (%) per round, mean over the ``ok`` records, on the rounds they all have."""
    curves = [
        {int(r): a for r, a in record["accuracy_per_round"].items() if a is not None}
        for record in cell_records
        if record.get("status") == "ok"
    ]
    if not curves:
        return {}
    rounds = sorted(set.intersection(*(set(c) for c in curves)))
    return {r: 100 * float(np.mean([c[r] for c in curves])) for r in rounds}
