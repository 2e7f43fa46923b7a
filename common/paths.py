"""Where a run reads data and writes results, resolved the same way on every node.

Flower runs the apps from its own copy of the code (under ``$FLWR_HOME/apps``), in a working
folder the SuperLink chose, so a relative default would point somewhere arbitrary. When the
environment was set up from a checkout (``make setup`` installs it in editable mode), the
defaults are that checkout's ``data/`` (where setup fetches the datasets) and ``results/``, so
a plain ``flwr run .`` finds both; otherwise a per-user cache and ``~/mosaic-results``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import cache
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

from common.config import RunConfig

DISTRIBUTION = "mosaic-fl"  # [project].name in pyproject.toml
USER_DATA_ROOT = Path.home() / ".cache" / "mosaic" / "data"
USER_RESULTS_DIR = Path.home() / "mosaic-results"


@cache
def installed_checkout() -> Path | None:
    """The checkout this environment installed the project from in editable mode, or None.

    Read from the install's ``direct_url.json`` (PEP 610), which pip writes for every install
    from a local folder; an install from a wheel or an index has no such folder.
    """
    for distribution in metadata.distributions(name=DISTRIBUTION):
        text = distribution.read_text("direct_url.json")
        if not text:
            continue
        record = json.loads(text)
        url = urlparse(record.get("url", ""))
        if record.get("dir_info", {}).get("editable") and url.scheme == "file":
            folder = Path(unquote(url.path))
            if (folder / "pyproject.toml").is_file():
                return folder
    return None


def default_data_root() -> Path:
    """``<checkout>/data`` when installed from a checkout, else ``~/.cache/mosaic/data``."""
    checkout = installed_checkout()
    return checkout / "data" if checkout is not None else USER_DATA_ROOT


def default_results_dir() -> Path:
    """``<checkout>/results`` when installed from a checkout, else ``~/mosaic-results``."""
    checkout = installed_checkout()
    return checkout / "results" if checkout is not None else USER_RESULTS_DIR


def data_root(cfg: RunConfig, node_config: Mapping[str, object] | None = None) -> Path:
    """The dataset root: node config ``data-root`` (deployment: data is node-local), then the
    run config's ``data-root``, then ``$MOSAIC_DATA_ROOT``, then :func:`default_data_root`."""
    node_value = str((node_config or {}).get("data-root", "") or "")
    chosen = node_value or cfg.data_root or os.environ.get("MOSAIC_DATA_ROOT", "")
    return Path(chosen).expanduser() if chosen else default_data_root()


def results_root(cfg: RunConfig) -> Path:
    """The folder under which each run writes its own results folder: ``results-dir``, then
    ``$MOSAIC_RESULTS_DIR``, then :func:`default_results_dir`."""
    chosen = cfg.results_dir or os.environ.get("MOSAIC_RESULTS_DIR", "")
    return Path(chosen).expanduser() if chosen else default_results_dir()
