"""The launchers' run config: pyproject defaults, a profile, ``--set`` pairs, validated.

Everything a launcher must know before it starts a process: the merged overrides to hand to
``flwr run``, the validated config they make (schema and strategy rules, naming the key), and
what the schema cannot know (the client count, the device, whether the data is on disk).
"""

from __future__ import annotations

import math
import os
import time
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.proto.federation_config_pb2 import SimulationConfig

from common.config import ConfigError, RunConfig, parse_run_config, pyproject_defaults
from common.data import DatasetNotFoundError, load_dataset
from common.train import resolve_device
from server_app.strategies import validate_run_config
from server_app.tracking import check_tracking

REPO = Path(__file__).resolve().parent.parent
# What flwr run's --federation-config accepts: the fields of Flower's SimulationConfig.
FEDERATION_KEYS = frozenset(
    field.name.replace("_", "-") for field in SimulationConfig.DESCRIPTOR.fields
)


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """``["alpha=0.5", "dataset=mnist"]`` -> ``{"alpha": 0.5, "dataset": "mnist"}``."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            value = tomllib.loads(f"value = {raw}")["value"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word: dataset=mnist means the string "mnist"
        overrides[key.strip()] = value
    return overrides


def _absolute(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def build_run_config(
    profile: Path | None, strategy: str | None, sets: Iterable[str], name: str | None
) -> tuple[dict[str, Any], RunConfig]:
    """The overrides to hand to ``flwr run`` and the validated config they make.

    Raises :class:`ConfigError` (naming the key) for anything Flower or the ServerApp would
    reject later.
    """
    overrides: dict[str, Any] = {}
    if profile is not None:
        with profile.open("rb") as handle:
            overrides.update(tomllib.load(handle))
    if strategy is not None:
        overrides["strategy"] = strategy
    overrides.update(parse_set(sets))
    if name is not None:
        overrides["run-name"] = name
    defaults = pyproject_defaults(REPO / "pyproject.toml")
    cfg = parse_run_config({**defaults, **overrides})  # types first, then fill in the paths

    overrides["results-dir"] = _absolute(
        cfg.results_dir or os.environ.get("MOSAIC_RESULTS_DIR") or REPO / "results"
    )
    overrides["data-root"] = _absolute(
        cfg.data_root or os.environ.get("MOSAIC_DATA_ROOT") or REPO / "data"
    )
    if not cfg.run_name:
        stem = profile.stem if profile is not None else "defaults"
        overrides["run-name"] = f"{cfg.strategy}-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return overrides, validate_run_config({**defaults, **overrides})


def check_runnable(cfg: RunConfig, clients: int, public_data: bool = True) -> torch.device:
    """What the schema cannot know: the client count, the device, the data (the public dataset
    under ``data-root``, unless ``public_data`` is false: the nodes bring their own and the
    server has no test set); return the device."""
    if clients < 1:
        raise ConfigError(f"--clients: {clients} is not a positive number of clients")
    if cfg.min_nodes > clients:
        raise ConfigError(
            f"min-nodes: {cfg.min_nodes} is more than the {clients} clients (--clients), so "
            "the first round would wait forever; lower min-nodes or raise --clients"
        )
    if len(cfg.tiers) > clients:
        raise ConfigError(
            f"width-tiers: {len(cfg.tiers)} tiers need at least as many clients, and --clients "
            f"is {clients}"
        )
    try:
        device = resolve_device(cfg.device)
    except RuntimeError as error:
        raise ConfigError(f"device: {error}") from None
    check_tracking(cfg.tracking)
    if not public_data:
        return device
    try:
        load_dataset(cfg.dataset, cfg.data_root, train=False)
    except (DatasetNotFoundError, ImportError) as error:
        raise ConfigError(f"data-root: {error}") from None
    return device


def client_gpus(device: torch.device, clients: int) -> float:
    """Ray's GPU share per ClientApp (see the module docstring)."""
    if device.type != "cuda":
        return 0.0
    return max(0.01, math.floor(100 / clients) / 100)


def federation_config(
    clients: int,
    device: torch.device,
    client_cpus: int = 1,
    client_gpus_each: float | None = None,
    extra: Iterable[str] = (),
) -> str:
    """The ``--federation-config`` of ``flwr run``: the node count and each ClientApp's Ray
    resources, then any ``KEY=VALUE`` pairs of ``extra`` passed through as Flower reads them
    (a key given there wins; the keys are Flower's ``SimulationConfig`` fields). Over-asking is
    refused here, naming the option: Ray would otherwise place no ClientApp and the run would
    die with "ActorPool is empty"."""
    cpus = os.cpu_count() or 1
    if not 1 <= client_cpus <= cpus:
        raise ConfigError(f"--client-cpus: {client_cpus} must be 1 to the {cpus} CPUs here")
    gpus = client_gpus(device, clients) if client_gpus_each is None else client_gpus_each
    if gpus < 0:
        raise ConfigError(f"--client-gpus: {gpus:g} is negative")
    if gpus > 0 and gpus > torch.cuda.device_count():
        raise ConfigError(
            f"--client-gpus: {gpus:g} GPUs per ClientApp, and {torch.cuda.device_count()} are "
            "visible here (CUDA_VISIBLE_DEVICES)"
        )
    pairs = {
        "num-supernodes": str(clients),
        "client-resources-num-cpus": str(client_cpus),
        "client-resources-num-gpus": f"{gpus:g}",
    }
    for item in extra:
        for pair in item.split():
            key, sep, value = pair.partition("=")
            if key == "num-supernodes":
                raise ConfigError("--federation-config: set the number of nodes with --clients")
            if not sep or key not in FEDERATION_KEYS:
                raise ConfigError(
                    f"--federation-config {pair!r}: expected KEY=VALUE with KEY one of "
                    f"{sorted(FEDERATION_KEYS)}"
                )
            pairs[key] = value
    return " ".join(f"{key}={value}" for key, value in pairs.items())
