"""A tiny fake FashionMNIST on disk (torchvision's raw IDX layout) and a tiny run config.

The images are learnable on purpose: class c lights one 7x7 block of a 4x4 grid (plus noise),
so a few SGD steps already beat chance and accuracy-based checks mean something.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from common.config import pyproject_defaults

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
NUM_CLASSES = 10


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file of uint8 data, the format torchvision's MNIST readers parse."""
    path.parent.mkdir(parents=True, exist_ok=True)
    magic = (0x08 << 8) | array.ndim
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes())


def class_pattern_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 images [N, 28, 28]: dim noise plus a bright 7x7 block whose place is the class."""
    pixels = rng.integers(0, 60, size=(len(labels), 28, 28))
    for index, label in enumerate(labels):
        row, col = divmod(int(label), 4)
        pixels[index, 7 * row : 7 * row + 7, 7 * col : 7 * col + 7] += 180
    return pixels.clip(0, 255).astype(np.uint8)


def write_fake_fashion_mnist(
    root: str | Path, *, n_train: int = 600, n_test: int = 200, seed: int = 0
) -> Path:
    """Write ``root/FashionMNIST/raw/*-ubyte`` with balanced, shuffled labels; return ``root``."""
    root = Path(root)
    raw = root / "FashionMNIST" / "raw"
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % NUM_CLASSES)
        write_idx(raw / f"{split}-images-idx3-ubyte", class_pattern_images(labels, rng))
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return root


TINY_SIZES: dict[str, Any] = {
    "num-rounds": 3,
    "kd-round": 2,
    "proto-start-round": 1,
    "proto-bank-rounds": 2,
    "local-steps": 3,
    "gen-steps": 3,
    "gen-batch-size": 8,
    "meta-epochs": 2,
    "kd-steps": 3,
    "kd-batch-per-generator": 4,
    "min-nodes": 2,
    "min-partition-size": 5,
    "alpha": 1.0,
    "model-width": 0.25,
    "gen-channels": 8,
    "batch-size": 16,
    "device": "cpu",
    "round-timeout": 60.0,
    "run-name": "test-run",
}


def tiny_run_config(root: str | Path, results_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """The pyproject defaults with tiny sizes, reading ``root`` and writing ``results_dir``.

    ``overrides`` use snake_case names (``num_rounds=1``) and become kebab-case keys.
    """
    config = pyproject_defaults(PYPROJECT)
    config.update(TINY_SIZES)
    config.update({"data-root": str(root), "results-dir": str(results_dir)})
    config.update({key.replace("_", "-"): value for key, value in overrides.items()})
    return config


# A valid value other than the tiny config's for every key that some part of the app is
# declared not to read (common.config.SERVER_ONLY_KEYS, benchmarks.UNREAD_KEYS): tests change
# them and check that nothing moves. ``strategy``: a method whose clients work as Mosaic's.
OTHER_VALUES: dict[str, Any] = {
    "strategy": "feddf",
    "results-dir": "/elsewhere",
    "run-name": "another-run",
    "resume": True,
    "num-rounds": 9,
    "min-nodes": 5,
    "fraction-train": 0.5,
    "fraction-evaluate": 0.3,
    "server-test-set": False,
    "test-samples": 50,
    "proto-max-samples": 7,
    "tracking": "tensorboard",
    "round-timeout": 30.0,
    "min-replies": 2,
    "lr": 0.05,
    "finetune-lr": 0.001,
    "kd-round": 4,
    "kd-every": 1,
    "proto-start-round": 2,
    "proto-bank-rounds": 4,
    "generator-round": 1,
    "meta-epochs": 7,
    "meta-lr": 0.01,
    "meta-batch-size": 32,
    "meta-val-fraction": 0.1,
    "meta-patience": 3,
    "meta-ema": 0.9,
    "meta-feedforward": 64,
    "meta-prior": "experts",
    "meta-prior-clients": 2,
    "meta-features": "global",
    "meta-input": "generated",
    "meta-samples": 64,
    "meta-min-confidence": 0.5,
    "kd-steps": 11,
    "kd-batch-per-generator": 7,
    "kd-lr": 0.01,
    "kd-alpha": 0.5,
    "kd-beta": 0.3,
    "kd-temperature": 2.0,
    "kd-generator-weighting": "size",
    "kd-proximal-mu": 0.3,
    "kd-ema": 0.9,
    "kd-pool-batches": 2,
    "kd-generators-per-step": 3,
    "dense-lambda-bn": 0.5,
    "dense-lambda-adv": 0.5,
    "proximal-mu": 0.5,
    "exclusive-width": 0.5,
    "kd-sub-models": True,
    "max-update-ratio": 50.0,
    "max-weight-ratio": 50.0,
    "min-claim-agreement": 0.5,
    "aggregation": "median",
    "trim-fraction": 0.1,
    "krum-malicious": 2,
    "protos-per-class": 2,
    "min-proto-samples": 2,
    "gen-steps": 2,
    "gen-batch-size": 4,
    "gen-latent-dim": 16,
    "gen-channels": 4,
    "gen-lr": 0.001,
    "lambda-adv": 0.5,
    "lambda-div": 1.0,
    "lambda-ent": 0.5,
    "lambda-inv": 0.5,
}


def write_fake_cifar10(
    root: Path,
    monkeypatch: Any,
    per_batch: int = 20,
    seed: int = 0,
    batch: tuple[np.ndarray, list[int]] | None = None,
) -> Path:
    """CIFAR-10's python release in torchvision's layout (``root/cifar-10-batches-py``), with
    ``per_batch`` random images per batch file (or every file holding ``batch``: rows of
    R, G, B planes and their labels), as a user would extract it. torchvision accepts
    the files only if their md5s match the real release's, so the fake ones are declared on the
    class through ``monkeypatch`` and the same check runs unchanged. Returns ``root``."""
    from torchvision.datasets import CIFAR10

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        if name == "batches.meta":
            entry: dict[str, Any] = {"label_names": [f"class-{c}" for c in range(10)]}
        else:
            data, labels = batch or (
                rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8),
                rng.integers(0, 10, per_batch).tolist(),
            )
            entry = {"data": data, "labels": list(labels)}
        (folder / name).write_bytes(pickle.dumps(entry))
        checksums[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    monkeypatch.setattr(
        CIFAR10,
        "train_list",
        [[f"data_batch_{i}", checksums[f"data_batch_{i}"]] for i in range(1, 6)],
    )
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", checksums["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": checksums["batches.meta"]})
    return root
