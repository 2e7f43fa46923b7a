"""The results folder of a run: one schema, written and read here.

``<results-dir>/<run-name>/`` holds ``config.json`` (the run config), ``metrics.json`` (per
round: test accuracy and loss, wall time, replies; at a teacher round its figures; and wall time
per phase) and the same rounds as ``metrics.csv`` (one row per round, for a spreadsheet or
pandas), ``participation.json`` (per round: who was sampled, replied, failed, was rejected
and why, bytes per node and record), ``label_counts.json`` (per client) and its picture
``partition.png``, ``run.log`` (the ServerApp's log), ``final_model.pt`` (a plain state dict),
``accuracy.png``, ``generator_samples/`` and ``report.html`` (all of it on one page,
:mod:`server_app.report_page`). :class:`RunReport` writes them (every file but the pictures and
the page is rewritten after each round, so a run that stops early still leaves its history);
:class:`RunResults` reads them back for the launchers' reports and the benchmark records.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from common.architectures import global_model_of
from common.config import RunConfig, parse_run_config
from common.data import (
    DatasetInfo,
    classifier_input_to_pixels,
    generator_to_classifier_input,
)
from common.models import Classifier, Generator
from server_app.tracking import make_tracker

CONFIG, METRICS, PARTICIPATION, LABEL_COUNTS, FINAL_MODEL = (
    "config.json",
    "metrics.json",
    "participation.json",
    "label_counts.json",
    "final_model.pt",
)
METRICS_CSV, RUN_LOG, PARTITION_PICTURE, ACCURACY_PICTURE = (
    "metrics.csv",
    "run.log",
    "partition.png",
    "accuracy.png",
)
TEACHER_FIGURES = ("teacher-accuracy", "pre-kd-accuracy", "post-kd-accuracy")
FEDERATED_ACCURACY = "federated-accuracy"  # the clients' evaluation, weighted by their samples


def accuracy_key(rounds: Mapping[int, Mapping[str, Any]]) -> str:
    """The accuracy a run is judged by: the server's test set (``accuracy``) when it has one,
    else the clients' federated evaluation (``server-test-set = false``)."""
    return "accuracy" if any("accuracy" in v for v in rounds.values()) else FEDERATED_ACCURACY


def _write_json(path: Path, payload: Any) -> None:
    write_atomically(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def write_atomically(path: Path, text: str) -> None:
    """Write then rename, so a reader never sees half a file."""
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def metrics_csv(rounds: Mapping[int, Mapping[str, Any]]) -> str:
    """One row per round (``round`` first, then every scalar recorded in any round, sorted by
    name; empty where a round has none): the per-round metrics as a table."""
    columns = sorted(
        {key for values in rounds.values() for key, v in values.items() if _is_scalar(v)}
    )
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["round", *columns])
    for server_round, values in sorted(rounds.items()):
        writer.writerow([server_round, *(_cell(values.get(key)) for key in columns)])
    return out.getvalue()


def _is_scalar(value: Any) -> bool:
    return isinstance(value, int | float | str | bool)


def _cell(value: Any) -> Any:
    return value if value is None or _is_scalar(value) else ""


class RunLog:
    """The ServerApp's log (Flower's ``flwr`` logger, which the strategies log to) copied into
    ``run.log`` in the results folder while the run lasts, appended to on resume."""

    def __init__(self, folder: Path) -> None:
        self.handler = logging.FileHandler(folder / RUN_LOG, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.logger = logging.getLogger("flwr")

    def __enter__(self) -> RunLog:
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()


class RunReport:
    """Collects what a run measured and writes it under ``<results-root>/<run-name>/``."""

    def __init__(self, root: Path, cfg: RunConfig, run_config: dict[str, Any]) -> None:
        name = cfg.run_name or f"{cfg.strategy}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.folder = root / name
        if self.folder.resolve().parent != root.resolve():  # the schema's pattern forbids it
            raise ValueError(f"run-name: {name!r} would write outside results-dir {root}")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.rounds: dict[int, dict[str, Any]] = {}
        self.phases: dict[str, float] = {}
        self.tracker = make_tracker(cfg.tracking, self.folder)
        _write_json(self.folder / CONFIG, run_config)

    def record_round(self, server_round: int, **values: Any) -> None:
        """Merge ``values`` into the round's entry, rewrite metrics.json and pass them to the
        tracker (``tracking``)."""
        self.rounds.setdefault(server_round, {}).update(values)
        self._write_metrics()
        self.tracker.log_round(server_round, values)

    def close(self) -> None:
        """Flush and close the tracker; the files are complete after every round anyway."""
        self.tracker.close()

    def state_dict(self) -> dict[int, dict[str, Any]]:
        """The per-round metrics so far, for checkpoints (phase times are per process)."""
        return {r: dict(values) for r, values in self.rounds.items()}

    def load_state_dict(self, rounds: dict[int, dict[str, Any]]) -> None:
        """Take back the metrics of a checkpoint and rewrite metrics.json with them."""
        self.rounds = {r: dict(values) for r, values in rounds.items()}
        self._write_metrics()

    def add_phase_seconds(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds
        self._write_metrics()

    def _write_metrics(self) -> None:
        _write_json(
            self.folder / METRICS,
            {
                "rounds": {str(r): v for r, v in sorted(self.rounds.items())},
                "phase-seconds": self.phases,
            },
        )
        write_atomically(self.folder / METRICS_CSV, metrics_csv(self.rounds))

    def write_label_counts(self, label_counts: dict[int, list[int]]) -> None:
        _write_json(
            self.folder / LABEL_COUNTS,
            {f"client-{pid}": counts for pid, counts in sorted(label_counts.items())},
        )

    def write_participation(self, rounds: dict[int, Any]) -> None:
        _write_json(
            self.folder / PARTICIPATION,
            {str(r): asdict(log) for r, log in sorted(rounds.items())},
        )

    def write_model(self, state: dict[str, torch.Tensor]) -> Path:
        """The final global model as a plain state dict: load with ``weights_only=True``."""
        path = self.folder / FINAL_MODEL
        torch.save({k: v.cpu() for k, v in state.items()}, path)
        return path

    def plot_partition(self, label_counts: Mapping[int, list[int]]) -> Path | None:
        """``partition.png``: each client's samples per class, stacked (how skewed the split is
        at a glance); None before any client reported its counts."""
        if not label_counts:
            return None
        plt = _pyplot()
        path = self.folder / PARTITION_PICTURE
        clients = sorted(label_counts)
        num_classes = max(len(counts) for counts in label_counts.values())
        fig, ax = plt.subplots(figsize=(7, max(3.5, 0.35 * len(clients) + 1.5)))
        left = [0] * len(clients)
        colours = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
        for c in range(num_classes):
            widths = [label_counts[k][c] if c < len(label_counts[k]) else 0 for k in clients]
            ax.barh(
                [str(k) for k in clients], widths, left=left, color=colours(c % 20), label=str(c)
            )
            left = [a + b for a, b in zip(left, widths, strict=True)]
        ax.set_xlabel("training samples")
        ax.set_ylabel("client (partition id)")
        ax.set_title(f"label counts per client ({self.cfg.partitioning}, alpha={self.cfg.alpha})")
        ax.invert_yaxis()
        ax.legend(title="class", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def plot_accuracy(self) -> Path:
        """``accuracy.png``: the global model's accuracy per round on the server's test set, or
        (without one) the clients' federated evaluation; the teacher and the model before
        distillation beside it."""
        plt = _pyplot()
        from matplotlib.ticker import MaxNLocator

        path = self.folder / ACCURACY_PICTURE
        key = accuracy_key(self.rounds)
        rounds = sorted(r for r, v in self.rounds.items() if key in v)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(
            rounds,
            [self.rounds[r][key] for r in rounds],
            marker="o",
            label=f"global model ({self.cfg.strategy})",
        )
        kd = self.rounds.get(self.cfg.kd_round, {})
        if "teacher-accuracy" in kd:
            ax.axhline(
                kd["teacher-accuracy"],
                color="gray",
                linestyle="--",
                label=f"teacher ({self.cfg.strategy}, round {self.cfg.kd_round})",
            )
        if "pre-kd-accuracy" in kd:
            ax.scatter(
                [self.cfg.kd_round],
                [kd["pre-kd-accuracy"]],
                color="red",
                zorder=3,
                label="before distillation",
            )
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test accuracy" if key == "accuracy" else "federated accuracy (clients)")
        ax.set_title(f"{self.cfg.dataset}, {self.cfg.partitioning} alpha={self.cfg.alpha}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def save_generator_samples(
        self,
        generators: Mapping[int, Generator],
        info: DatasetInfo,
        per_client: int = 64,
    ) -> list[Path]:
        """One PNG grid of samples per client generator, as the classifier would see them."""
        from torchvision.utils import save_image  # imported here for the reason of _pyplot

        folder = self.folder / "generator_samples"
        folder.mkdir(exist_ok=True)
        paths = []
        for partition_id, generator in sorted(generators.items()):
            generator.eval()
            with torch.no_grad():
                images = generator_to_classifier_input(generator.sample(per_client, "cpu"), info)
            path = folder / f"client-{partition_id}.png"
            save_image(classifier_input_to_pixels(images, info), path, nrow=8)
            paths.append(path)
        return paths


def _pyplot() -> Any:
    """matplotlib's pyplot on the headless Agg backend, imported when a picture is drawn: a
    launcher or a test reading results back never pays the ~1 s it costs to import."""
    import matplotlib

    matplotlib.use("Agg")  # the ServerApp has no display
    import matplotlib.pyplot as plt

    return plt


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


@dataclass(frozen=True)
class RunResults:
    """A results folder read back: what :class:`RunReport` wrote, with round numbers as ints."""

    folder: Path
    rounds: dict[int, dict[str, Any]]
    phase_seconds: dict[str, float]
    participation: dict[int, dict[str, Any]]
    label_counts: dict[str, list[int]]
    test_samples: int = 0  # the run's test-samples: > 0, its accuracy is on that many samples

    @classmethod
    def read(cls, folder: Path) -> RunResults:
        """Read ``folder``; files a run did not get to write read as empty."""
        metrics = _read_json(folder / METRICS, {})
        return cls(
            folder=folder,
            rounds={int(r): v for r, v in metrics.get("rounds", {}).items()},
            phase_seconds=dict(metrics.get("phase-seconds", {})),
            participation={int(r): v for r, v in _read_json(folder / PARTICIPATION, {}).items()},
            label_counts=_read_json(folder / LABEL_COUNTS, {}),
            test_samples=int(_read_json(folder / CONFIG, {}).get("test-samples", 0)),
        )

    @property
    def last_round(self) -> int | None:
        return max(self.rounds) if self.rounds else None

    def teacher_rounds(self) -> dict[int, Mapping[str, Any]]:
        """The rounds that built a teacher (``teacher-accuracy`` recorded), in order."""
        return {r: v for r, v in sorted(self.rounds.items()) if "teacher-accuracy" in v}

    def bytes_per_client(self) -> dict[str, float]:
        """Mean total bytes per client over the run, ``downlink`` and ``uplink`` (from the
        per-node ``traffic`` of each round; a run without it gives ``{}``)."""
        result = {}
        for direction in ("downlink", "uplink"):
            per_node: dict[str, int] = {}
            for round_log in self.participation.values():
                for node, sizes in round_log.get("traffic", {}).items():
                    if direction in sizes:
                        per_node[node] = per_node.get(node, 0) + sizes[direction]["total"]
            if per_node:
                result[direction] = sum(per_node.values()) / len(per_node)
        return result

    def summary_lines(self) -> list[str]:
        """What a user looks for first: final accuracy, the teacher's figures, wall times."""
        if self.last_round is None:
            return [f"no metrics in {self.folder}"]
        last = self.last_round
        key = accuracy_key(self.rounds)
        label = (
            "test accuracy" if key == "accuracy" else "federated accuracy (clients' held-out data)"
        )
        if key == "accuracy" and self.test_samples:
            label += f" ({self.test_samples} test samples)"
        value = self.rounds[last].get(key)
        lines = [
            f"final {label}: " + ("-" if value is None else f"{value:.4f}") + f" (round {last})"
        ]
        lines += [
            f"final test accuracy, {key.removesuffix('-accuracy').replace('-', ' ')} sub-model: "
            f"{value:.4f}"
            for key, value in sorted(self.rounds[last].items())
            if key.startswith("width-") and key.endswith("-accuracy")
        ]
        for server_round, values in self.teacher_rounds().items():
            lines += [
                f"{key}: {values[key]:.4f} (round {server_round})"
                for key in TEACHER_FIGURES
                if key in values
            ]
        phases = sorted(self.phase_seconds.items(), key=lambda item: item[0] == "total")
        lines += [f"wall time, {phase}: {seconds:.1f} s" for phase, seconds in phases]
        lines.append(f"results: {self.folder}")
        return lines


def load_model(folder: Path | str) -> Classifier:
    """The final global model of a results folder, ready to use: the architecture its
    ``config.json`` names (model, width, data set), holding ``final_model.pt``, in eval mode.

    ``final_model.pt`` is a plain state dict, loaded with ``weights_only=True``, so a results
    folder from elsewhere cannot run code."""
    folder = Path(folder)
    cfg = parse_run_config(json.loads((folder / CONFIG).read_text()))
    model = global_model_of(cfg)
    model.load_state_dict(torch.load(folder / FINAL_MODEL, weights_only=True))
    return model.eval()
