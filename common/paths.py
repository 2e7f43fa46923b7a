"""Where a run reads data and writes results, resolved the same way on every node."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from common.config import RunConfig

DEFAULT_DATA_ROOT = Path.home() / ".cache" / "mosaic" / "data"
DEFAULT_RESULTS_DIR = Path.home() / "mosaic-results"


def data_root(cfg: RunConfig, node_config: Mapping[str, object] | None = None) -> Path:
    """The dataset root: node config ``data-root`` (deployment: data is node-local), then the
    run config's ``data-root``, then ``$MOSAIC_DATA_ROOT``, then ``~/.cache/mosaic/data``."""
    node_value = str((node_config or {}).get("data-root", "") or "")
    chosen = node_value or cfg.data_root or os.environ.get("MOSAIC_DATA_ROOT", "")
    return Path(chosen).expanduser() if chosen else DEFAULT_DATA_ROOT


def results_root(cfg: RunConfig) -> Path:
    """The folder under which each run writes its own results folder."""
    chosen = cfg.results_dir or os.environ.get("MOSAIC_RESULTS_DIR", "")
    return Path(chosen).expanduser() if chosen else DEFAULT_RESULTS_DIR
