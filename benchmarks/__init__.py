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

Run it with ``python -m benchmarks --suite quick``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import resource
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.published import render_published
from benchmarks.reply_cache import ReplyCache
from benchmarks.targets import render_targets
from common.config import (
    DENSE_KEYS,
    DISTILLATION_KEYS,
    META_KEYS,
    ConfigError,
    parse_run_config,
    pyproject_defaults,
)
from deploy.simulation import parse_set

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
Runner = Callable[[Mapping[str, Any], int], Any]

# The two protocols as run-config overrides. One-shot: one round, every client trains longer,
# then the server builds its teacher (and distills) after that round. Multi-round: FedAvg
# warm-up, prototypes from round 3, teacher + distillation after round 5, fine-tuning after.
# One-shot clients train 5 epochs (the reference numbers' local work); multi-round clients take
# 50 SGD steps a round, as the default run. One-shot distillation is not pulled back to the
# FedAvg model (kd-proximal-mu 0): no FedAvg round follows it, and the one-round FedAvg model
# is a poor anchor (FashionMNIST alpha 0.1, seed 0: 82.8 unpulled, 77.9 at mu 1, 70.6 at 10).
# Nothing follows a one-shot distillation either, so it runs longer (1500 steps, the released
# code's 1500-2500) and keeps the moving average of the student (kd-ema 0.998): the last
# iterate drifts on generator samples (MNIST alpha 0.1: 300 steps 96.21 / 93.64 / 95.05 on
# seeds 0-2, 1500 steps 93.28 / 93.55 / 93.25), the average does not (docs/results.md).
PROTOCOLS: dict[str, dict[str, Any]] = {
    "one-shot": {
        "num-rounds": 1,
        "kd-round": 1,
        "proto-start-round": 1,
        "local-epochs": 5.0,
        "kd-proximal-mu": 0.0,
        "kd-steps": 1500,
        "kd-ema": 0.998,
    },
    "multi-round": {
        "num-rounds": 10,
        "kd-round": 5,
        "proto-start-round": 3,
        "local-epochs": 0.0,
        "local-steps": 50,
    },
}

# Strategies whose result is their teacher (never distilled into the global model).
TEACHER_ONLY = frozenset({"ensemble", "label-share"})

# Run-config keys each strategy's result does not depend on: a record stays current when only
# these changed (a new distillation default does not rerun FedAvg). tests/test_benchmarks.py
# runs every strategy with all of its keys here changed and checks that nothing moves.
_PROTOTYPES = frozenset(
    {"proto-start-round", "proto-bank-rounds", "protos-per-class", "min-proto-samples"}
)
_CLIENT_GENERATOR = frozenset(
    {
        "generator-round",
        "gen-steps",
        "gen-batch-size",
        "lambda-adv",
        "lambda-div",
        "lambda-ent",
        "lambda-inv",
    }
)
_GENERATOR = _CLIENT_GENERATOR | {"gen-latent-dim", "gen-channels", "gen-lr"}
_FEDAVG_UNREAD = (
    DISTILLATION_KEYS
    | META_KEYS
    | _PROTOTYPES
    | _GENERATOR
    | DENSE_KEYS
    | {"meta-prior", "kd-every"}  # teacher-only baselines: judged at kd-round
)
UNREAD_KEYS: dict[str, frozenset[str]] = {
    "fedavg": _FEDAVG_UNREAD | {"proximal-mu"},
    "fedprox": _FEDAVG_UNREAD,
    "ensemble": _FEDAVG_UNREAD | {"proximal-mu"},
    "label-share": _FEDAVG_UNREAD | {"proximal-mu"},
    "dense": META_KEYS
    | _PROTOTYPES
    | _CLIENT_GENERATOR
    | {"meta-prior", "kd-generator-weighting", "kd-proximal-mu", "kd-ema", "proximal-mu"},
    "feddf": META_KEYS | _PROTOTYPES | DENSE_KEYS | {"meta-prior", "proximal-mu"},
    "mosaic-no-meta": META_KEYS | _PROTOTYPES | DENSE_KEYS | {"proximal-mu"},
    "mosaic": DENSE_KEYS | {"proximal-mu"},
}


@dataclass(frozen=True)
class Cell:
    """One run of the benchmark: a method in a setting with a seed."""

    dataset: str
    alpha: float
    num_clients: int
    protocol: str
    strategy: str
    seed: int

    @property
    def setting(self) -> str:
        return f"{self.protocol} {self.dataset} alpha={self.alpha} clients={self.num_clients}"

    @property
    def key(self) -> str:
        return (
            f"{self.protocol}-{self.dataset}-a{self.alpha}-n{self.num_clients}"
            f"-{self.strategy}-s{self.seed}"
        )


@dataclass(frozen=True)
class Suite:
    """Cells and the run-config overrides (sizes, step counts) all of them share."""

    name: str
    cells: list[Cell]
    sizes: dict[str, Any] = field(default_factory=dict)


def grid(
    datasets: Sequence[str],
    alphas: Sequence[float],
    num_clients: int,
    protocol: str,
    strategies: Sequence[str],
    seeds: Sequence[int],
) -> list[Cell]:
    """Every combination, as cells."""
    return [
        Cell(dataset, alpha, num_clients, protocol, strategy, seed)
        for dataset in datasets
        for alpha in alphas
        for strategy in strategies
        for seed in seeds
    ]


ALL_STRATEGIES = [
    "fedavg",
    "fedprox",
    "ensemble",
    "label-share",
    "feddf",
    "dense",
    "mosaic-no-meta",
    "mosaic",
]

SUITES: dict[str, Suite] = {
    # One setting, one seed, every method, modest steps: minutes on the 2-core CPU machine when
    # it is idle, under 20 when other jobs load it (docs/results.md has the timings).
    "quick": Suite(
        "quick",
        grid(["fashion-mnist"], [0.1], 5, "one-shot", ALL_STRATEGIES, [0]),
        sizes={
            "local-epochs": 1.0,
            "gen-steps": 50,
            "meta-epochs": 30,
            "kd-steps": 100,
            "kd-ema": 0.0,  # an average over 100 steps would still be mostly the start
            "model-width": 0.5,
        },
    ),
    # The issue's table: hours on CPU.
    "full": Suite(
        "full",
        grid(["fashion-mnist", "mnist"], [0.1, 0.3, 0.5], 5, "one-shot", ALL_STRATEGIES, [0, 1, 2])
        + grid(["fashion-mnist"], [0.01, 0.1, 1.0], 10, "multi-round", ALL_STRATEGIES, [0, 1, 2]),
    ),
}


def select_cells(suite: Suite, pattern: str) -> Suite:
    """The cells of ``suite`` whose key matches the shell-style ``pattern``, same sizes."""
    cells = [cell for cell in suite.cells if fnmatch.fnmatchcase(cell.key, pattern)]
    return Suite(suite.name, cells, suite.sizes)


def cell_run_config(
    cell: Cell, base: Mapping[str, Any], sizes: Mapping[str, Any], runs_dir: Path
) -> dict[str, Any]:
    """The run config of a cell: ``base``, then the protocol, the suite's sizes, the cell."""
    config = {**base, **PROTOCOLS[cell.protocol], **sizes}
    config.update(
        {
            "dataset": cell.dataset,
            "alpha": cell.alpha,
            "strategy": cell.strategy,
            "seed": cell.seed,
            "min-nodes": cell.num_clients,
            "results-dir": str(runs_dir),
            "run-name": cell.key,
            "resume": False,
        }
    )
    if cell.strategy == "fedprox" and not config.get("proximal-mu"):
        config["proximal-mu"] = 0.01
    return config


def _bytes_per_client(folder: Path) -> dict[str, float]:
    """Mean total bytes per client over the run, down and up, from participation.json.

    Reads the per-node ``traffic`` each round log carries (server_app/traffic.py); a run
    without it gives ``{}``.
    """
    path = folder / "participation.json"
    if not path.exists():
        return {}
    result = {}
    for direction in ("downlink", "uplink"):
        per_node: dict[str, int] = {}
        for round_log in json.loads(path.read_text()).values():
            for node, sizes in round_log.get("traffic", {}).items():
                if direction in sizes:
                    per_node[node] = per_node.get(node, 0) + sizes[direction]["total"]
        if per_node:
            result[direction] = float(np.mean(list(per_node.values())))
    return result


def _reset_peak_rss() -> None:
    """Start a new peak-memory window for this process (Linux: ``/proc/self/clear_refs``).

    Cells run one after another in one process; without the reset each record would carry
    the peak of every cell before it. Elsewhere the peak stays process-wide.
    """
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float:
    """Peak resident memory since :func:`_reset_peak_rss` (Linux ``VmHWM``), in MiB; the
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
    MNIST label-share at 2 threads vs Mosaic at 1 gave teachers 96.10 vs 96.05, session 9).
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
    _reset_peak_rss()
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
    folder = runs_dir / cell.key
    metrics = json.loads((folder / "metrics.json").read_text())
    rounds = {int(r): values for r, values in metrics["rounds"].items()}
    last = rounds[max(rounds)]
    distilled = distillations(rounds)
    kd = distilled.get(int(config["kd-round"]), {})
    label_counts_path = folder / "label_counts.json"
    record.update(
        status="ok",
        final_accuracy=last.get("accuracy"),
        accuracy_per_round={r: v.get("accuracy") for r, v in sorted(rounds.items())},
        teacher_accuracy=kd.get("teacher"),
        pre_kd_accuracy=kd.get("pre_kd"),
        post_kd_accuracy=kd.get("post_kd"),
        distillations=distilled,
        phase_seconds=metrics.get("phase-seconds", {}),
        wall_seconds=round(time.perf_counter() - started, 1),
        bytes_per_client=_bytes_per_client(folder),
        peak_rss_mb=round(_peak_rss_mb(), 1),
        peak_gpu_mb=_peak_gpu_mb(),
        hardware=hardware(),
        label_counts=(
            json.loads(label_counts_path.read_text()) if label_counts_path.exists() else {}
        ),
    )
    if reply_cache is not None:
        record["client_replies"] = {
            "reused": reply_cache.reused - before[0],
            "computed": reply_cache.computed - before[1],
        }
    return record


def distillations(rounds: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """Teacher, pre-KD and post-KD accuracy of every round that distilled (``kd-every`` runs
    distill after several rounds; the record's top-level figures are the kd-round's only)."""
    return {
        r: {
            "teacher": values.get("teacher-accuracy"),
            "pre_kd": values.get("pre-kd-accuracy"),
            "post_kd": values.get("post-kd-accuracy"),
        }
        for r, values in sorted(rounds.items())
        if "teacher-accuracy" in values
    }


def method_accuracy(record: Mapping[str, Any]) -> float | None:
    """The accuracy a method is judged by: its teacher if never distilled, else the model's."""
    if record.get("status") != "ok":
        return None
    if record["cell"]["strategy"] in TEACHER_ONLY:
        return record.get("teacher_accuracy")
    return record.get("final_accuracy")


def _write_json(path: Path, payload: Any) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(partial, path)


# Run-config keys added after records were first made, each with the value under which the
# app behaves as it did before the key existed: a record that lacks the key ran with it.
ADDED_KEYS: dict[str, Any] = {"kd-every": 0, "kd-proximal-mu": 0.0, "kd-ema": 0.0}

# Run-config keys that say where a run reads and writes, not what it computes: they differ
# between clones (absolute paths), and records are committed so that every clone reuses them.
PLACE_KEYS = frozenset({"data-root", "results-dir"})


def _changed_keys(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The keys whose value differs between a record's config and ``current`` (compared as
    JSON stores them), leaving out those the cell's strategy does not read (``UNREAD_KEYS``):
    a changed default or suite size makes an old record stale, and reusing it would put a
    number under a config that did not produce it."""
    current = json.loads(json.dumps(dict(current), sort_keys=True, default=str))
    recorded = {**ADDED_KEYS, **recorded}
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
    write_bar_chart(table, out / "accuracy.png")
    write_round_plot(table, out / "accuracy_per_round.png")
    return records


def _recorded(path: Path, config: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """A cell's recorded ``ok`` record (None if there is none) and the run-config keys that
    changed since it was made: reused only when none did."""
    if not path.exists():
        return None, []
    record = json.loads(path.read_text())
    if record.get("status") != "ok":
        return None, []
    return record, _changed_keys(record.get("config", {}), config)


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


def _by_setting(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list]]:
    table: dict[str, dict[str, list]] = {}
    for record in records:
        cell = Cell(**record["cell"])
        table.setdefault(cell.setting, {}).setdefault(cell.strategy, []).append(record)
    return table


def render_table(records: Sequence[Mapping[str, Any]], suite_name: str = "") -> str:
    """Markdown: per setting, one row per method (mean ± std over seeds, in %)."""
    lines = [f"# Benchmark results{f' ({suite_name} suite)' if suite_name else ''}", ""]
    lines.append(
        "Accuracy in % on the test set, mean ± std over seeds. *Method* is the global model's "
        "final accuracy, except for the teachers that are not distilled (ensemble, label-share), "
        "judged by their teacher accuracy at the kd-round. Wall time is the whole run, less the "
        "client work a cell reused from another (*replies reused*: client replies taken from "
        "the reply cache, of all the cells' replies; a reused reply is the one the client "
        "would send again). Uplink is the mean total bytes a client sent over the run."
    )
    if suite_name:
        lines += ["", render_targets(records, suite_name, method_accuracy, TEACHER_ONLY).rstrip()]
    published = render_published(records, method_accuracy)
    if published:
        lines += ["", published.rstrip()]
    for setting, methods in _by_setting(records).items():
        lines += ["", f"## {setting}", ""]
        lines.append(
            "| method | seeds | method acc | global model | teacher | pre-KD | post-KD "
            "| wall s | replies reused | uplink MB/client | crashed |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for strategy, group in methods.items():
            ok = [r for r in group if r.get("status") == "ok"]
            crashed = [r for r in group if r.get("status") != "ok"]
            uplink = [r["bytes_per_client"].get("uplink") for r in ok]
            uplink_mb = [u / 2**20 for u in uplink if u is not None]
            walls = [r["wall_seconds"] for r in ok]
            lines.append(
                "| "
                + " | ".join(
                    [
                        strategy,
                        str(len(ok)),
                        _mean_std([method_accuracy(r) for r in ok]),
                        _mean_std([r.get("final_accuracy") for r in ok]),
                        _mean_std([r.get("teacher_accuracy") for r in ok]),
                        _mean_std([r.get("pre_kd_accuracy") for r in ok]),
                        _mean_std([r.get("post_kd_accuracy") for r in ok]),
                        f"{np.mean(walls):.0f}" if walls else "-",
                        _replies_reused(ok),
                        f"{np.mean(uplink_mb):.2f}" if uplink_mb else "-",
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


def suite_base(data_root: Path) -> dict[str, Any]:
    """The run config every cell of a suite starts from: the pyproject defaults, the data, and
    the CPU (the suite's own records are made there; another device is a variant)."""
    return {
        **pyproject_defaults(PYPROJECT),
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
            parse_run_config(cell_run_config(cell, base, suite.sizes, out / "runs"))
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
