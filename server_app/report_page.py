"""``report.html``: one self-contained page per run, read from its results folder alone.

Everything a reader looks for after a run, on one page that opens in any browser from the
file system with no server and nothing fetched: the headline figures (final accuracy, each
tier's sub-model, the teacher's figures, traffic, wall time), the accuracy curve, the partition
picture, every round's metrics, what was refused or failed and why, the generators' samples,
and the run config. Pictures are embedded as base64 PNGs; the page has no scripts. It is built
from the files :class:`server_app.results.RunReport` wrote, so it can be rebuilt for any
finished folder (``mosaic-report <folder>``, or ``python -m server_app.report_page <folder>``).
"""

from __future__ import annotations

import base64
import html
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from server_app.results import (
    ACCURACY_PICTURE,
    CONFIG,
    PARTITION_PICTURE,
    TEACHER_FIGURES,
    RunResults,
    accuracy_key,
    write_atomically,
)

REPORT_PAGE = "report.html"
# The per-round columns shown first, in this order; any other scalar follows by name.
ROUND_COLUMNS = (
    "accuracy",
    "loss",
    "federated-accuracy",
    "federated-loss",
    "seconds",
    "replied",
    "rejected",
    "failed",
    "missing",
)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.key, th.key { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
.samples img { width: 14em; margin: 0.3em; image-rendering: pixelated; }
.note { color: #666; font-size: 0.9em; }
.wide { overflow-x: auto; }
"""


def write_report_page(folder: Path) -> Path:
    """Write ``folder/report.html`` from the results files in ``folder``; return its path."""
    path = folder / REPORT_PAGE
    write_atomically(path, report_page(folder))
    return path


def report_page(folder: Path) -> str:
    """The page's HTML for the results folder ``folder``."""
    results = RunResults.read(folder)
    config = _read_config(folder)
    title = (
        f"{config.get('strategy', '?')} on {config.get('dataset', '?')} "
        f"({config.get('partitioning', '?')}, alpha={config.get('alpha', '?')})"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_text(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_text(title)}</h1>",
        f'<p class="note">results folder: {_text(str(folder))}</p>',
        _section("Summary", _summary_table(results)),
        _section("Accuracy per round", _picture(folder / ACCURACY_PICTURE, "accuracy per round")),
        _section(
            "How the data was split",
            _picture(folder / PARTITION_PICTURE, "label counts per client"),
        ),
        _section("Rounds", _rounds_table(results.rounds)),
        _section("Refused and failed replies", _refusals(results.participation)),
        _section("Wall time per phase", _phases_table(results.phase_seconds)),
        _section("Generator samples", _samples(folder / "generator_samples")),
        _section("Run config", _table(["key", "value"], sorted(config.items()), keys=2)),
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    return json.loads(path.read_text()) if path.is_file() else {}


def _summary_table(results: RunResults) -> str:
    if results.last_round is None:
        return "<p>No round was recorded.</p>"
    last = results.rounds[results.last_round]
    key = accuracy_key(results.rounds)
    label = "test accuracy" if key == "accuracy" else "federated accuracy (clients' held-out data)"
    rows: list[tuple[str, Any]] = [
        (f"final {label} (round {results.last_round})", _number(last.get(key)))
    ]
    rows += [
        (f"final {key.removesuffix('-accuracy').replace('-', ' ')} sub-model accuracy", _number(v))
        for key, v in sorted(last.items())
        if key.startswith("width-") and key.endswith("-accuracy")
    ]
    for server_round, values in results.teacher_rounds().items():
        rows += [
            (f"{key} (round {server_round})", _number(values[key]))
            for key in TEACHER_FIGURES
            if values.get(key) is not None
        ]
    for direction, size in results.bytes_per_client().items():
        rows.append((f"{direction} per client, whole run", f"{size / 2**20:.2f} MiB"))
    if "total" in results.phase_seconds:
        rows.append(("wall time", f"{results.phase_seconds['total']:.1f} s"))
    return _table(["figure", "value"], rows, keys=1)


def _rounds_table(rounds: Mapping[int, Mapping[str, Any]]) -> str:
    if not rounds:
        return ""
    scalars = {
        key
        for values in rounds.values()
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    columns = [c for c in ROUND_COLUMNS if c in scalars]
    columns += sorted(scalars - set(columns))
    rows = [[r, *(_number(values.get(c)) for c in columns)] for r, values in sorted(rounds.items())]
    return f'<div class="wide">{_table(["round", *columns], rows)}</div>'


def _refusals(participation: Mapping[int, Mapping[str, Any]]) -> str:
    rows = []
    for server_round, entry in sorted(participation.items()):
        for node, rule in sorted(entry.get("rejected", {}).items()):
            rows.append((server_round, node, "refused", rule))
        for node, why in sorted(entry.get("failed", {}).items()):
            rows.append((server_round, node, "failed", why))
        for node in entry.get("missing", []):
            rows.append((server_round, node, "missing", "no reply before round-timeout"))
        if entry.get("skipped"):
            rows.append((server_round, "-", "round skipped", entry["skipped"]))
    if not rows:
        return "<p>None: every sampled node answered and every reply was accepted.</p>"
    return _table(["round", "node", "what", "rule or reason"], rows, keys=4)


def _phases_table(phases: Mapping[str, float]) -> str:
    rows = sorted(phases.items(), key=lambda item: item[0] == "total")
    return _table(["phase", "seconds"], [(name, f"{s:.1f}") for name, s in rows], keys=1)


def _samples(folder: Path) -> str:
    pictures = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not pictures:
        return ""
    figures = [
        f"<figure>{_picture(path, path.stem)}<figcaption>{_text(path.stem)}</figcaption></figure>"
        for path in pictures
    ]
    return '<div class="samples">' + "".join(figures) + "</div>"


def _picture(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_text(alt)}" src="data:image/png;base64,{data}">'


def _section(heading: str, body: str) -> str:
    return f"<h2>{_text(heading)}</h2>\n{body}" if body else ""


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], keys: int = 0) -> str:
    """An HTML table; the first ``keys`` columns are left-aligned labels."""

    def cells(row: Sequence[Any], tag: str) -> str:
        return "".join(
            f"<{tag}{' class=key' if i < keys else ''}>{_text(str(v))}</{tag}>"
            for i, v in enumerate(row)
        )

    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    return f"<table><tr>{cells(header, 'th')}</tr>{body}</table>"


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _text(value: str) -> str:
    return html.escape(value, quote=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild ``report.html`` in each results folder named (default: the current one)."""
    for argument in (sys.argv[1:] if argv is None else argv) or ["."]:
        print(write_report_page(Path(argument)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
