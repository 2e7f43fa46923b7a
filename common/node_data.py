"""A site's own data: a folder a SuperNode points its ClientApp at (``--node-config data-dir=``).

In a real federation every site holds its own data; the simulation's public-split partitioning
(``partition-id``/``num-partitions``) is then replaced by a folder on the node's disk:

    <data-dir>/train.npz    images: uint8 [N, H, W], [N, H, W, C] or [N, C, H, W]
                            labels: integer [N], classes 0 .. num_classes - 1
    <data-dir>/test.npz     (optional) the same layout: this site's held-out data, which the
                            ClientApp scores the global model on (federated evaluation)

The images must have the run's dataset's shape (``dataset`` in the run config says which
normalisation and classifier apply); they are read with ``allow_pickle=False``, so a data file
cannot run code. A node without a ``partition-id`` in its node config answers under an id
derived from its training data's content (:func:`content_id`): stable across restarts, and a
second node holding the very same data is refused by the server's ``partition-claimed`` rule.

``python -m common.node_data OUT --dataset fashion-mnist --partitions 3`` writes such folders
(``OUT/node-<i>``) from a public dataset, split as a simulation would split it: for demos and
tests of a deployment where every node reads only its own folder.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

from common.data import (
    DatasetInfo,
    PartitionScheme,
    dataset_info,
    dataset_names,
    partition_indices,
    pixels_to_input,
    read_pixels,
)

TRAIN, TEST = "train.npz", "test.npz"
LAYOUT = (
    "expected <data-dir>/train.npz (and optionally test.npz) holding 'images' (uint8 "
    "[N, H, W], [N, H, W, C] or [N, C, H, W]) and 'labels' (integers [N]); see common/node_data.py"
)


class NodeDataError(ValueError):
    """A node's data folder is missing or does not hold what :mod:`common.node_data` expects;
    the message names the path and the layout."""


def _channels_first(images: np.ndarray, info: DatasetInfo, path: Path) -> np.ndarray:
    channels, height, width = info.image_shape
    if images.shape[1:] == (channels, height, width):
        return images
    if images.shape[1:] == (height, width, channels):
        return images.transpose(0, 3, 1, 2)
    if channels == 1 and images.shape[1:] == (height, width):
        return images[:, None]
    raise NodeDataError(
        f"{path}: images of shape {list(images.shape)} do not fit {info.name} "
        f"({channels}x{height}x{width}); {LAYOUT}"
    )


def read_split(
    folder: Path | str, split: str, info: DatasetInfo
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split (``train.npz`` or ``test.npz``) of a node's folder as the classifier reads it:
    float32 images ``[N, C, H, W]`` normalised as ``info`` says, int64 labels ``[N]``."""
    path = Path(folder).expanduser() / split
    if not path.is_file():
        raise NodeDataError(f"{path}: no such file; {LAYOUT}")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            images, labels = arrays["images"], arrays["labels"]
    except (OSError, ValueError, KeyError) as error:
        raise NodeDataError(f"{path}: unreadable ({error}); {LAYOUT}") from None
    if images.dtype != np.uint8:
        raise NodeDataError(f"{path}: images are {images.dtype}, not uint8 pixels; {LAYOUT}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise NodeDataError(f"{path}: labels must be integers [N]; {LAYOUT}")
    if len(images) != len(labels) or len(labels) == 0:
        raise NodeDataError(
            f"{path}: {len(images)} images and {len(labels)} labels (need as many, at least one)"
        )
    if labels.min() < 0 or labels.max() >= info.num_classes:
        raise NodeDataError(
            f"{path}: labels span {labels.min()}..{labels.max()}, and {info.name} has classes "
            f"0..{info.num_classes - 1}"
        )
    pixels = torch.from_numpy(np.ascontiguousarray(_channels_first(images, info, path)))
    return pixels_to_input(pixels, info), torch.from_numpy(labels.astype(np.int64))


def content_id(folder: Path | str) -> int:
    """A partition id for a node without one: from its training file's bytes (31 bits, so it
    fits every integer field on the wire), the same after a restart or a move."""
    path = Path(folder).expanduser() / TRAIN
    if not path.is_file():
        raise NodeDataError(f"{path}: no such file; {LAYOUT}")
    digest = hashlib.sha256(path.read_bytes()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF


def write_node_folders(
    name: str,
    root: Path | str,
    out: Path | str,
    partitions: int,
    scheme: PartitionScheme = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 10,
) -> list[Path]:
    """``out/node-<i>`` for each partition of a public dataset: its training rows as a
    simulation would split them (``scheme``, ``alpha``, ``seed``) and an IID share of the test
    split, both as uint8 pixels in the layout :func:`read_split` reads."""
    root = str(Path(root).expanduser().resolve())
    train_pixels, train_labels = read_pixels(name, root, train=True)
    test_pixels, test_labels = read_pixels(name, root, train=False)
    train_parts = partition_indices(
        train_labels.numpy(),
        partitions,
        scheme,
        alpha=alpha,
        min_partition_size=min_partition_size,
        seed=seed,
    )
    test_parts = partition_indices(test_labels.numpy(), partitions, "iid", seed=seed)
    folders = []
    for i, (train_rows, test_rows) in enumerate(zip(train_parts, test_parts, strict=True)):
        folder = Path(out) / f"node-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        for split, pixels, labels, rows in (
            (TRAIN, train_pixels, train_labels, train_rows),
            (TEST, test_pixels, test_labels, test_rows),
        ):
            np.savez(folder / split, images=pixels[rows].numpy(), labels=labels[rows].numpy())
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m common.node_data",
        description="Write one data folder per node (train.npz, test.npz) from a public dataset.",
    )
    parser.add_argument("out", type=Path, help="the folders go to OUT/node-<i>")
    parser.add_argument("--dataset", choices=dataset_names(), default="fashion-mnist")
    parser.add_argument("--root", type=Path, default=Path("data"), help="where the dataset is")
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--partitioning", choices=["dirichlet", "iid"], default="dirichlet")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dataset_info(args.dataset)
    folders = write_node_folders(
        args.dataset, args.root, args.out, args.partitions, args.partitioning, args.alpha, args.seed
    )
    for folder in folders:
        print(f"{folder}: start its SuperNode with --node-config 'data-dir=\"{folder.resolve()}\"'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
