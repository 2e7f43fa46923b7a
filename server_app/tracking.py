"""Optional experiment tracking: every round's scalars to TensorBoard (``tracking``).

The results folder (``server_app.results``) is the record of a run and needs nothing
installed. ``tracking = "tensorboard"`` also writes each round's scalars (accuracy, loss,
federated evaluation, the teacher's figures, phase times, participation counts) as TensorBoard
events under ``<results>/<run-name>/tensorboard/``, for comparing runs side by side:

    pip install -e ".[tracking]"        # tensorboard
    tensorboard --logdir results/       # every run of the folder, one curve each

Weights & Biases reads the same events (``wandb.init(sync_tensorboard=True)`` or ``wandb sync``
on the folder), so no W&B code is needed in the app, and the default stays offline.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from common.config import ConfigError, Tracking

TENSORBOARD_FOLDER = "tensorboard"


class Tracker(Protocol):
    def log_round(self, server_round: int, values: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class NoTracking:
    """The default: the results folder only."""

    def log_round(self, server_round: int, values: Mapping[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


class TensorBoardTracker:
    """Each scalar of a round as a TensorBoard scalar at step ``server_round``, flushed at once
    (so a run watched live, or one that stops, shows every round it finished)."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder / TENSORBOARD_FOLDER))

    def log_round(self, server_round: int, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, server_round)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def check_tracking(kind: Tracking) -> None:
    """Refuse a tracker whose package is missing, before anything trains."""
    if kind == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "tracking: 'tensorboard' needs the tensorboard package: pip install -e '.[tracking]'"
        )


def make_tracker(kind: Tracking, folder: Path) -> Tracker:
    """The run's tracker (``tracking``), writing under the results ``folder``."""
    check_tracking(kind)
    return TensorBoardTracker(folder) if kind == "tensorboard" else NoTracking()
