"""The server's state after each round, written atomically and read back without unpickling.

A checkpoint is one ``torch.save`` of plain data: tensors, dicts, lists, numbers, strings and
bools. It is read with ``torch.load(weights_only=True)``, which refuses anything else, so a
tampered checkpoint cannot run code. It is written to ``checkpoint.pt.partial`` and renamed
over ``checkpoint.pt``, so a run killed at any moment leaves the last complete round behind.

A run with ``resume = true`` continues from it only with the run config it was written with:
the keys in :data:`RESUMABLE_CHANGES` may differ (they do not change what is computed, only
where, or how long to wait); any other difference is refused with the keys named.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import ConfigError

CHECKPOINT_NAME = "checkpoint.pt"
RESUMABLE_CHANGES = frozenset({"resume", "round-timeout", "device", "data-root", "results-dir"})


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's global RNG states as plain data."""
    version, python_state, gauss_next = random.getstate()
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(python_state)},
        "numpy": {
            "keys": torch.from_numpy(numpy_keys.astype(np.int64)),
            "pos": int(numpy_pos),
            "has-gauss": int(numpy_has_gauss),
            "gauss": float(numpy_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if gauss_next is not None:
        state["python"]["gauss-next"] = gauss_next
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python.get("gauss-next")))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has-gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``folder/checkpoint.pt``: write, flush to disk, then rename."""
    path = folder / CHECKPOINT_NAME
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as handle:
        torch.save(dict(state), handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return path


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The last complete checkpoint in ``folder``, or None when there is none."""
    path = folder / CHECKPOINT_NAME
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` naming each key whose value differs from the checkpoint's."""
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    changed = sorted(k for k in keys if saved.get(k) != current.get(k))
    if changed:
        lines = [
            f"  {k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now; resume needs "
            "the run config the run started with"
            for k in changed
        ]
        raise ConfigError("cannot resume:\n" + "\n".join(lines))
