"""Benchmarks: Mosaic against the baselines, one JSON record per cell, a table and a chart.

A suite is data: a list of :class:`Cell` (dataset, alpha, clients, protocol, strategy, seed)
and the run-config sizes its runs share. Each cell runs through ``run_inprocess`` (the full
server loop with in-process ClientApps, no Ray), and its record is written to
``<out>/cells/<key>.json``. A cell whose record says ``ok`` and holds the cell's current run
config is reused unless ``force`` (a changed default makes it stale, and it runs again); a cell
that raised is recorded as ``crashed`` with the error (and run again next time), never dropped.
Cells that send the clients the same message share the clients' replies through a
:class:`~benchmarks.reply_cache.ReplyCache` (``client-replies`` beside the suites' folders;
``--no-reply-cache`` turns it off). From the records, :func:`write_table` writes
``results.md`` (mean +- std over seeds per method and setting) and :func:`write_bar_chart`
``accuracy.png``.

The suites and protocols are data in :mod:`benchmarks.suites`; the table and charts come
from the records alone (:mod:`benchmarks.report`); this module runs cells and keeps records.

Run it with ``python -m benchmarks --suite quick``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.reply_cache import ReplyCache
from benchmarks.report import (
    method_accuracy,
    refresh_generated_block,
    render_table,
    write_bar_chart,
    write_round_plot,
    write_table,
)
from benchmarks.suites import (
    ALL_STRATEGIES,
    PROTOCOLS,
    SUITES,
    TEACHER_ONLY,
    UNREAD_KEYS,
    Cell,
    Suite,
    cell_run_config,
    grid,
    select_cells,
)
from common.config import ConfigError, pyproject_defaults
from deploy.run_config import parse_set
from server_app.results import RunResults
from server_app.strategies import validate_run_config

__all__ = [
    "ALL_STRATEGIES",
    "PROTOCOLS",
    "SUITES",
    "TEACHER_ONLY",
    "UNREAD_KEYS",
    "Cell",
    "Suite",
    "cell_run_config",
    "grid",
    "main",
    "method_accuracy",
    "refresh_quoted_table",
    "render_table",
    "run_cell",
    "run_suite",
    "select_cells",
    "write_bar_chart",
    "write_round_plot",
    "write_table",
]

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
# The document that quotes the generated tables (between ``<!-- generated: PATH -->`` markers).
DOCS_RESULTS = REPO / "docs" / "results.md"
Runner = Callable[[Mapping[str, Any], int], Any]


def reset_peak_rss() -> None:
    """Start a new peak-memory window for this process (Linux: ``/proc/self/clear_refs``).

    Cells run one after another in one process; without the reset each record would carry
    the peak of every cell before it. Elsewhere the peak stays process-wide.
    """
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """Peak resident memory since :func:`reset_peak_rss` (Linux ``VmHWM``), in MiB; the
    process's peak so far where ``/proc`` has none."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _reset_peak_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gpu_mb() -> float | None:
    """Peak GPU memory PyTorch allocated since :func:`_reset_peak_gpu`, in MiB; ``None``
    without CUDA (the run's tensors then count in the resident memory)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def hardware() -> dict[str, Any]:
    """Where a cell ran: wall times compare only between records of the same hardware.

    The torch thread count is recorded too: CPU kernels sum in a different order with another
    count, so two cells' client models agree to the bit only when their counts do (one-shot
    MNIST label-share at 2 threads vs Mosaic at 1 gave teachers 96.10 vs 96.05).
    """
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def inprocess_runner(reply_cache: ReplyCache | None = None) -> Runner:
    """``run_inprocess`` with the project's ClientApp, answering from ``reply_cache`` if given."""
    from client_app.app import app
    from server_app.inprocess import run_inprocess

    client_app = reply_cache.wrap(app) if reply_cache is not None else app

    def runner(config: Mapping[str, Any], num_nodes: int) -> Any:
        return run_inprocess(config, num_nodes, client_app=client_app)

    return runner


def run_cell(
    cell: Cell,
    config: Mapping[str, Any],
    runs_dir: Path,
    runner: Runner,
    reply_cache: ReplyCache | None = None,
) -> dict[str, Any]:
    """Run one cell and return its record; an exception becomes a ``crashed`` record.

    With ``reply_cache``, the record counts the client replies the cell reused and computed:
    its wall time holds only the client work it did itself."""
    record: dict[str, Any] = {"cell": asdict(cell), "key": cell.key, "config": dict(config)}
    reset_peak_rss()
    _reset_peak_gpu()
    if reply_cache is not None:
        before = (reply_cache.reused, reply_cache.computed)
    started = time.perf_counter()
    try:
        runner(config, cell.num_clients)
    except Exception as error:  # a crashed cell is reported, never dropped
        record.update(
            status="crashed",
            error=f"{type(error).__name__}: {error}",
            traceback=traceback.format_exc(limit=8),
            wall_seconds=round(time.perf_counter() - started, 1),
        )
        return record
    results = RunResults.read(runs_dir / cell.key)
    rounds = results.rounds
    last = rounds[max(rounds)]
    distilled = distillations(rounds)
    kd = distilled.get(int(config["kd-round"]), {})
    record.update(
        status="ok",
        final_accuracy=last.get("accuracy"),
        accuracy_per_round={r: v.get("accuracy") for r, v in sorted(rounds.items())},
        teacher_accuracy=kd.get("teacher"),
        pre_kd_accuracy=kd.get("pre_kd"),
        post_kd_accuracy=kd.get("post_kd"),
        distillations=distilled,
        phase_seconds=results.phase_seconds,
        wall_seconds=round(time.perf_counter() - started, 1),
        bytes_per_client=results.bytes_per_client(),
        peak_rss_mb=round(peak_rss_mb(), 1),
        peak_gpu_mb=_peak_gpu_mb(),
        hardware=hardware(),
        label_counts=results.label_counts,
        sub_model_accuracy={  # width tiers: each smaller tier's sub-model of the final model
            key.removeprefix("width-").removesuffix("-accuracy"): value
            for key, value in last.items()
            if key.startswith("width-") and key.endswith("-accuracy")
        },
        arch_accuracy={  # mixed architectures: each architecture's model of the final zoo
            key.removeprefix("arch-").removesuffix("-accuracy"): value
            for key, value in last.items()
            if key.startswith("arch-") and key.endswith("-accuracy")
        },
    )
    if reply_cache is not None:
        record["client_replies"] = {
            "reused": reply_cache.reused - before[0],
            "computed": reply_cache.computed - before[1],
        }
    return record


def distillations(rounds: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """Teacher, pre-KD and post-KD accuracy of every round that distilled (``kd-every`` runs
    distill after several rounds; the record's top-level figures are the kd-round's only), and
    the prior's where a trained meta model's teacher was scored against it."""
    return {
        r: {
            "teacher": values.get("teacher-accuracy"),
            "pre_kd": values.get("pre-kd-accuracy"),
            "post_kd": values.get("post-kd-accuracy"),
            **({"prior": values["prior-accuracy"]} if "prior-accuracy" in values else {}),
        }
        for r, values in sorted(rounds.items())
        if "teacher-accuracy" in values
    }


def _write_json(path: Path, payload: Any) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(partial, path)


# Run-config keys added after records were first made, each with the value under which the
# app behaves as it did before the key existed: a record that lacks the key ran with it.
ADDED_KEYS: dict[str, Any] = {
    "kd-every": 0,
    "kd-proximal-mu": 0.0,
    "kd-ema": 0.0,
    "meta-features": "experts",
    "max-update-ratio": 0.0,
    "max-weight-ratio": 0.0,
    "min-claim-agreement": 0.0,
    "server-test-set": True,
    "augment": "none",
    "tracking": "none",
    "aggregation": "mean",
    "trim-fraction": 0.2,
    "krum-malicious": 1,
    "kd-pool-batches": 0,
    "kd-generators-per-step": 10,  # every recorded cell has at most 10 clients: all of them
    "width-tiers": "",
    "architectures": "",
    "meta-input": "prototypes",
    "meta-samples": 512,
    "meta-min-confidence": 0.9,
    "width-scheme": "static",
    "exclusive-width": 1.0,
    "kd-sub-models": False,
    "partition-seed": -1,  # -1: the split follows seed, as it always did
    "test-samples": 0,  # every test image
    "proto-max-samples": 0,  # prototypes from every local image
    "meta-feedforward": 2048,  # nn.Transformer's default, the released code's
    "meta-prior-clients": 30,  # every recorded cell has at most 10 clients: all of them
}
# Run-config keys removed since records were made, each with the value under which the app
# behaved as it does now: a record that holds the key with that value is still current.
REMOVED_KEYS: dict[str, Any] = {
    "fault-mode": "none",  # test scaffolding, now in tests/faults.py
    "fault-partition": -1,
}

# Run-config keys that say where a run reads and writes, not what it computes: they differ
# between clones (absolute paths), and records are committed so that every clone reuses them.
PLACE_KEYS = frozenset({"data-root", "results-dir"})


def _changed_keys(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The keys whose value differs between a record's config and ``current`` (compared as
    JSON stores them), leaving out those the cell's strategy does not read (``UNREAD_KEYS``):
    a changed default or suite size makes an old record stale, and reusing it would put a
    number under a config that did not produce it."""
    current = json.loads(json.dumps(dict(current), sort_keys=True, default=str))
    recorded, current = {**ADDED_KEYS, **recorded}, {**ADDED_KEYS, **current}
    for key, value in REMOVED_KEYS.items():
        if recorded.get(key, value) == value:
            recorded.pop(key, None)
    unread = UNREAD_KEYS.get(current.get("strategy", ""), frozenset()) | PLACE_KEYS
    return sorted(
        k
        for k in recorded.keys() | current.keys()
        if recorded.get(k) != current.get(k) and k not in unread
    )


def run_suite(
    suite: Suite,
    out: Path,
    *,
    base: Mapping[str, Any] | None = None,
    force: bool = False,
    runner: Runner | None = None,
    progress: Callable[[str], None] = print,
    table_cells: Sequence[Cell] = (),
    reply_cache: ReplyCache | None = None,
) -> list[dict[str, Any]]:
    """Run (or reuse) every cell of ``suite``; write records, the table and the charts.

    The table and charts also hold the records already made for ``table_cells`` (the whole
    suite when ``suite`` is a ``--cells`` selection of it), so a suite filled in piece by piece
    always shows everything measured under its current config. Returns ``suite``'s records.
    """
    if runner is None:
        runner = inprocess_runner(reply_cache)
    base = dict(base if base is not None else pyproject_defaults(PYPROJECT))
    cells_dir, runs_dir = out / "cells", out / "runs"
    cells_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index, cell in enumerate(suite.cells, start=1):
        path = cells_dir / f"{cell.key}.json"
        config = cell_run_config(cell, base, suite.sizes, runs_dir)
        if not force:
            record, changed = _recorded(path, config)
            if record is not None and not changed:
                progress(f"[{index}/{len(suite.cells)}] {cell.key}: reused")
                records.append(record)
                continue
            if record is not None:
                progress(f"[{index}/{len(suite.cells)}] {cell.key}: stale ({', '.join(changed)})")
        progress(f"[{index}/{len(suite.cells)}] {cell.key}: running")
        record = run_cell(cell, config, runs_dir, runner, reply_cache)
        _write_json(path, record)
        record = json.loads(path.read_text())  # as a later reuse will read it
        progress(
            f"[{index}/{len(suite.cells)}] {cell.key}: {record['status']}"
            f" ({record['wall_seconds']} s, accuracy {method_accuracy(record)})"
        )
        records.append(record)
    ran = {record["key"]: record for record in records}
    table = []
    for cell in dict.fromkeys([*table_cells, *suite.cells]):  # the suite's order
        record, changed = ran.get(cell.key), []
        if record is None:
            config = cell_run_config(cell, base, suite.sizes, runs_dir)
            record, changed = _recorded(cells_dir / f"{cell.key}.json", config)
        if record is not None and not changed:
            table.append(record)
    write_table(table, out / "results.md", suite.name)
    refresh_quoted_table(out / "results.md")
    write_bar_chart(table, out / "accuracy.png")
    write_round_plot(table, out / "accuracy_per_round.png")
    return records


def refresh_quoted_table(table: Path, document: Path = DOCS_RESULTS) -> bool:
    """Refresh ``document``'s quote of ``table`` if it quotes it (a ``generated`` marker naming
    the table's path in this repository, e.g. ``benchmarks/results/full/results.md``).

    Only a table inside the repository can be quoted, so suites written elsewhere (the tests'
    temporary folders, a user's ``--out``) never touch the docs. Returns whether it changed.
    """
    try:
        source = table.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return False
    return refresh_generated_block(document, table, source)


def _recorded(path: Path, config: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """A cell's recorded ``ok`` record (None if there is none) and the run-config keys that
    changed since it was made: reused only when none did."""
    if not path.exists():
        return None, []
    record = json.loads(path.read_text())
    if record.get("status") != "ok":
        return None, []
    return record, _changed_keys(record.get("config", {}), config)


def suite_base(data_root: Path) -> dict[str, Any]:
    """The run config every cell of a suite starts from: the pyproject defaults, the data, and
    the CPU (the suite's own records are made there; another device is a variant)."""
    return {
        **pyproject_defaults(PYPROJECT),
        "proximal-mu": 0.01,  # FedProx's term (the default 0 is plain FedAvg); others ignore it
        "data-root": str(data_root.resolve()),
        "device": "cpu",
    }


def variant_overrides(device: str, assignments: Sequence[str]) -> dict[str, Any]:
    """The run-config overrides of a suite variant: ``--set KEY=VALUE`` pairs, and the device
    unless it is the CPU the suite's own records are made on. A device this machine lacks
    fails here (``RuntimeError``), before any cell."""
    from common.train import resolve_device

    overrides = parse_set(assignments)
    resolved = resolve_device(str(overrides.pop("device", device)))
    if resolved.type != "cpu":
        overrides["device"] = str(resolved)
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--data-root", default="data")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where clients and server compute (cpu | auto | cuda | cuda:N | mps). Another device"
        " than cpu is a variant of the suite (OUT/SUITE+device=cuda), as with --set: its wall"
        " times and rounding differ, so it never replaces the CPU records",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="rerun cells already recorded, every client reply computed afresh",
    )
    parser.add_argument(
        "--no-reply-cache",
        action="store_true",
        help="every cell trains its own clients (by default cells that send the clients the"
        " same message reuse their replies, kept under OUT/client-replies)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run-config key in every cell (TOML literal; repeatable): a variant"
        " of the suite, recorded under OUT/SUITE+KEY=VALUE, beside the suite's own records",
    )
    parser.add_argument(
        "--cells",
        metavar="GLOB",
        default="*",
        help="run only the suite's cells whose key matches (e.g. 'one-shot-*-a0.1-*-s0'); their"
        " records are the full suite's, reused when the whole suite runs",
    )
    args = parser.parse_args(argv)
    base = suite_base(Path(args.data_root))
    try:
        overrides = variant_overrides(args.device, args.set)
    except (ConfigError, RuntimeError) as error:
        parser.error(str(error))
    whole = SUITES[args.suite]
    whole = Suite(whole.name, whole.cells, {**whole.sizes, **overrides})
    out = args.out / (args.suite + "".join(f"+{k}={v}" for k, v in overrides.items()))
    suite = select_cells(whole, args.cells)
    if not suite.cells:
        parser.error(f"--cells {args.cells!r} matches no cell of suite {args.suite!r}")
    for cell in suite.cells:  # a bad override fails here, naming the key, not in every cell
        try:
            validate_run_config(cell_run_config(cell, base, suite.sizes, out / "runs"))
        except ConfigError as error:
            parser.error(f"--set: {error}")
    reply_cache = None
    if not args.no_reply_cache:  # shared by every suite and variant: keys say what decides
        reply_cache = ReplyCache(args.out / "client-replies", read=not args.force)
    records = run_suite(
        suite,
        out,
        base=base,
        force=args.force,
        table_cells=whole.cells,
        reply_cache=reply_cache,
    )
    crashed = [r["key"] for r in records if r.get("status") != "ok"]
    print(
        f"table: {out / 'results.md'}  charts: {out / 'accuracy.png'},"
        f" {out / 'accuracy_per_round.png'}"
    )
    if crashed:
        print(f"crashed cells: {', '.join(crashed)}", file=sys.stderr)
    return 1 if crashed else 0
