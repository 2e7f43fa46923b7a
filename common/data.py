"""Datasets, normalisation and client partitions.

Images are read once per process, in torchvision's folder layout (``download=False``: fetching
is :mod:`common.fetch_data`'s job; the MNIST family's IDX files by :func:`read_idx`, the rest by
torchvision's readers), and handed out as one normalised float32 tensor; a simulation then
slices its clients out of that tensor instead of re-reading the files for every client.
Partitions come from flwr_datasets' partitioners, run on a table of labels and row indices only,
so they are seeded, reproducible and cheap, and are kept per data root (``.partitions/``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

PartitionScheme = Literal["dirichlet", "iid", "pathological"]


@dataclass(frozen=True)
class DatasetInfo:
    """What models and generators must know about a dataset: shape, classes, normalisation."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (channels, height, width)
    mean: tuple[float, ...]  # per channel, of pixels in [0, 1]
    std: tuple[float, ...]


_DATASETS = {
    info.name: info
    for info in (
        DatasetInfo("fashion-mnist", 10, (1, 28, 28), (0.2860,), (0.3530,)),
        DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,)),
        DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        DatasetInfo("svhn", 10, (3, 32, 32), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    )
}


def dataset_names() -> list[str]:
    """The dataset names a run config may use."""
    return list(_DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """Shape, class count and normalisation of a dataset; unknown names fail loudly."""
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {dataset_names()}")
    return _DATASETS[name]


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not under the data root; the message says how to get them."""


_TORCHVISION_FOLDER = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


def _missing_message(name: str, root: str) -> str:
    if name in ("fashion-mnist", "mnist"):
        return (
            f"{name} not found under {root} (torchvision's layout: "
            f"{root}/{_TORCHVISION_FOLDER[name]}/raw/train-images-idx3-ubyte ...). "
            f"Fetch it with: python -m common.fetch_data --dataset {name} --root {root}"
        )
    if name == "cifar10":
        return (
            f"cifar10 not found or corrupted under {root}. It is not fetched automatically: "
            "download cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) and "
            f"extract it in {root}, so that {root}/cifar-10-batches-py/ holds data_batch_1 .. "
            "data_batch_5, test_batch and batches.meta (torchvision checks their md5)."
        )
    return (
        f"svhn not found or corrupted under {root}. It is not fetched automatically: put "
        "train_32x32.mat and test_32x32.mat (http://ufldl.stanford.edu/housenumbers/) directly "
        f"in {root}, i.e. {root}/train_32x32.mat (torchvision checks their md5)."
    )


def read_idx(path: Path) -> np.ndarray:
    """An uncompressed IDX file of unsigned bytes, the MNIST family's format: two zero bytes,
    the type code 0x08, the rank, the dimensions as big-endian int32, then the data.

    The same parse as torchvision's ``read_sn3_pascalvincent_tensor``, without importing
    torchvision: that import costs each ClientApp process about 1.3 s, and in deployment every
    message starts one. Raises ``ValueError`` when the bytes do not match their header."""
    data = bytearray(path.read_bytes())  # writable, so torch.from_numpy can share it
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    rank = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=rank, offset=4).astype(np.int64)
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank)
    if len(dims) != rank or body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {body.size} bytes of data for dimensions {dims.tolist()}")
    return body.reshape(dims.tolist())


def _read_mnist_family(name: str, root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's layout (``root/FashionMNIST/raw/train-images-idx3-ubyte`` ...) and checks
    (images of rank 3, one label each), read by :func:`read_idx`."""
    raw = Path(root) / _TORCHVISION_FOLDER[name] / "raw"
    split = "train" if train else "t10k"
    try:
        images = read_idx(raw / f"{split}-images-idx3-ubyte")
        labels = read_idx(raw / f"{split}-labels-idx1-ubyte")
    except (OSError, ValueError) as error:
        raise DatasetNotFoundError(_missing_message(name, root)) from error
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetNotFoundError(
            f"{_missing_message(name, root)} (found images {images.shape}, labels {labels.shape})"
        )
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()


def read_pixels(name: str, root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, C, H, W] and int64 labels [N], as torchvision's readers give them."""
    if name in ("fashion-mnist", "mnist"):
        return _read_mnist_family(name, root, train)
    if name == "svhn" and importlib.util.find_spec("scipy") is None:
        raise ImportError("svhn is stored as .mat files, which need scipy: pip install scipy")
    # Imported here, not at the top: a node on its own data folder (common.node_data) never
    # reads a public dataset, and each ClientApp process would pay about a second for it.
    from torchvision import datasets as tv_datasets

    try:
        if name == "cifar10":
            cifar = tv_datasets.CIFAR10(root, train=train, download=False)
            pixels = torch.from_numpy(cifar.data).permute(0, 3, 1, 2)  # stored HWC
            return pixels.contiguous(), torch.tensor(cifar.targets, dtype=torch.int64)
        svhn = tv_datasets.SVHN(root, split="train" if train else "test", download=False)
        return torch.from_numpy(svhn.data), torch.from_numpy(svhn.labels).long()  # already CHW
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
        raise DatasetNotFoundError(_missing_message(name, root)) from error


def _channel_stats(info: DatasetInfo, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    def as_column(values: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(values, device=like.device, dtype=like.dtype).view(-1, 1, 1)

    return as_column(info.mean), as_column(info.std)


def pixels_to_input(pixels: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 images ``[N, C, H, W]`` as the classifier reads them: in [0, 1], normalised with
    the dataset's channel statistics (the same for every client and the server)."""
    images = pixels.to(torch.float32).div_(255)
    mean, std = _channel_stats(info, images)
    return images.sub_(mean).div_(std)


@functools.lru_cache(maxsize=4)
def _load_normalised(name: str, root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pixels, labels = read_pixels(name, root, train)
    return pixels_to_input(pixels, dataset_info(name)), labels


def load_dataset(name: str, root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as (float32 images [N, C, H, W] normalised, int64 labels [N]).

    Cached per (name, root, train) for the life of the process, because a simulation asks for
    the same split once per client: treat the returned tensors as read-only.
    """
    dataset_info(name)  # unknown names fail before touching the disk
    return _load_normalised(name, str(Path(root).expanduser().resolve()), train)


def evaluation_subset(
    images: torch.Tensor, labels: torch.Tensor, samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` rows of a split, drawn by a fixed permutation (seed 0, whatever the run's
    seed) and kept in their original order: every run that asks for the same size is judged
    on the same images. ``samples`` of 0 or at least the split's size keep it whole."""
    if not 0 < samples < len(labels):
        return images, labels
    rows = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:samples]
    rows = rows.sort().values
    return images[rows], labels[rows]


def generator_to_classifier_input(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Map a generator's tanh output in [-1, 1] into the classifier's normalised input space.

    Classifiers are trained on normalised pixels; feeding them raw tanh output would put every
    synthetic sample off the data distribution (the released Mosaic code makes that mistake).
    """
    mean, std = _channel_stats(info, x)
    return ((x + 1) / 2 - mean) / std


def classifier_input_to_pixels(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Undo the normalisation into pixels in [0, 1] (clamped), e.g. to save sample grids."""
    mean, std = _channel_stats(info, x)
    return (x * std + mean).clamp(0, 1)


def label_counts(labels: torch.Tensor | np.ndarray, num_classes: int) -> list[int]:
    """Samples per class, one int per class (what a client reports to build the experts)."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=num_classes)
    if len(counts) > num_classes:
        raise ValueError(f"labels go up to {len(counts) - 1}, beyond num_classes={num_classes}")
    return counts.tolist()


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: PartitionScheme,
    *,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    min_partition_size: int = 10,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split a dataset's rows over clients; one sorted int64 index array per partition.

    The same arguments always give the same partitions, and the partitions are disjoint.
    ``dirichlet`` draws each class's split over clients from Dir(alpha) (small alpha: strong
    label skew); ``pathological`` gives every client ``classes_per_partition`` random classes;
    ``iid`` shuffles with ``seed`` and cuts equal shards.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if not 1 <= num_partitions <= len(labels):
        raise ValueError(f"num_partitions must be in 1..{len(labels)}, got {num_partitions}")
    # Imported here for the same reason as torchvision in read_pixels: Hugging Face datasets
    # and the partitioners cost a ClientApp process about a second; only partitioning needs them.
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    rows = np.arange(len(labels))
    partitioner: Partitioner
    if scheme == "iid":
        # IidPartitioner cuts contiguous shards, so shuffle first: otherwise the seed would be
        # ignored and a class-sorted dataset would come out pathological.
        rows = np.random.default_rng(seed).permutation(len(labels))
        partitioner = IidPartitioner(num_partitions)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            seed=seed,
        )
    elif scheme == "pathological":
        partitioner = PathologicalPartitioner(
            num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_partition,
            class_assignment_mode="random",
            seed=seed,
        )
    else:
        raise ValueError(f"unknown scheme {scheme!r}; use dirichlet, iid or pathological")
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels[rows], "index": rows})
    try:
        with warnings.catch_warnings():  # Dirichlet warns on every redraw; the error below says it
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            return [
                np.sort(np.asarray(partitioner.load_partition(pid)["index"], dtype=np.int64))
                for pid in range(num_partitions)
            ]
    except ValueError as error:
        if scheme != "dirichlet":
            raise
        raise ValueError(
            f"dirichlet partitioning of {len(labels)} samples into {num_partitions} partitions "
            f"with alpha={alpha} left a partition below min_partition_size={min_partition_size} "
            "in every draw; raise alpha, lower min_partition_size or use fewer partitions"
        ) from error


PARTITION_CACHE = ".partitions"  # under the data root: one .npz per split asked for


def _partition_cache_file(root: str, name: str, labels: np.ndarray, arguments: tuple) -> Path:
    """Where the partitions of ``labels`` under ``arguments`` are kept: named by a hash of the
    labels, the arguments and the flwr-datasets version, so a changed input is a new file."""
    from importlib.metadata import version

    digest = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    digest.update(repr((arguments, version("flwr-datasets"))).encode())
    return Path(root) / PARTITION_CACHE / f"{name}-{digest.hexdigest()[:32]}.npz"


def _read_partition_cache(path: Path, num_partitions: int, size: int) -> list[np.ndarray] | None:
    """The cached partitions, or None when the file is missing or not a valid split of ``size``
    rows into ``num_partitions`` disjoint parts (then they are computed and written again)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            parts = [stored[f"p{pid}"] for pid in range(num_partitions)]
    except (OSError, KeyError, ValueError):
        return None
    rows = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    valid = (
        all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
        and (len(rows) == 0 or (rows.min() >= 0 and rows.max() < size))
        and len(np.unique(rows)) == len(rows)
    )
    return parts if valid else None


def _write_partition_cache(path: Path, parts: list[np.ndarray]) -> None:
    """Write atomically (a temporary file renamed into place: processes that partition at the
    same time never read half a file); a read-only data root just goes without the cache."""
    try:
        path.parent.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
            np.savez(tmp, **{f"p{pid}": part for pid, part in enumerate(parts)})
    except OSError:
        return
    try:
        os.replace(tmp.name, path)
    except OSError:
        Path(tmp.name).unlink(missing_ok=True)  # leave no half-named file behind


@functools.lru_cache(maxsize=8)
def _client_partitions(
    name: str,
    root: str,
    num_partitions: int,
    scheme: PartitionScheme,
    alpha: float,
    classes_per_partition: int,
    min_partition_size: int,
    seed: int,
) -> list[torch.Tensor]:
    """Every client's rows, computed once per data root: in deployment each message starts a
    fresh ClientApp process, and partitioning (with the Hugging Face import) costs it ~3 s."""
    _, labels = load_dataset(name, root, train=True)
    arguments = (num_partitions, scheme, alpha, classes_per_partition, min_partition_size, seed)
    cache = _partition_cache_file(root, name, labels.numpy(), arguments)
    indices = _read_partition_cache(cache, num_partitions, len(labels))
    if indices is None:
        indices = partition_indices(
            labels.numpy(),
            num_partitions,
            scheme,
            alpha=alpha,
            classes_per_partition=classes_per_partition,
            min_partition_size=min_partition_size,
            seed=seed,
        )
        _write_partition_cache(cache, indices)
    return [torch.from_numpy(part) for part in indices]


def load_client_partition(
    name: str,
    root: str | Path,
    partition_id: int,
    num_partitions: int,
    scheme: PartitionScheme = "dirichlet",
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    min_partition_size: int = 10,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One client's training images and labels, from the train split.

    Every client of a run must pass the same partitioning arguments; the split is computed once
    per process and cached, so each client only pays for slicing its rows.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition_id {partition_id} is out of range for {num_partitions} partitions "
            f"(valid: 0..{num_partitions - 1})"
        )
    resolved = str(Path(root).expanduser().resolve())
    images, labels = load_dataset(name, resolved, train=True)
    rows = _client_partitions(
        name,
        resolved,
        num_partitions,
        scheme,
        alpha,
        classes_per_partition,
        min_partition_size,
        seed,
    )[partition_id]
    return images[rows], labels[rows]
