"""Datasets, normalisation and partitions, on tiny synthetic files in torchvision's formats."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import (
    PARTITION_CACHE,
    DatasetNotFoundError,
    _client_partitions,
    classifier_input_to_pixels,
    dataset_info,
    dataset_names,
    evaluation_subset,
    generator_to_classifier_input,
    label_counts,
    load_client_partition,
    load_dataset,
    partition_indices,
    read_idx,
    read_pixels,
)
from tests.fakedata import write_fake_cifar10, write_idx

SCHEMES = ["dirichlet", "iid", "pathological"]
# With random class assignment some class may go to no partition; flwr_datasets warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:Classes.*will NOT be used")


@pytest.fixture
def labels() -> np.ndarray:
    """1000 samples, 100 per class, sorted by class (the worst case for contiguous shards)."""
    return np.repeat(np.arange(10), 100)


def _write_fashion_mnist(root: Path, n_train: int = 40, n_test: int = 10) -> None:
    raw = root / "FashionMNIST" / "raw"
    for split, n in (("train", n_train), ("t10k", n_test)):
        pixels = np.zeros((n, 28, 28), dtype=np.uint8)
        pixels[:, :14] = 255  # top half white, bottom half black
        write_idx(raw / f"{split}-images-idx3-ubyte", pixels)
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)


# --- partitioning ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partitions_are_reproducible_for_a_seed_and_change_with_it(labels, scheme) -> None:
    first = partition_indices(labels, 10, scheme, seed=3)
    again = partition_indices(labels, 10, scheme, seed=3)
    other = partition_indices(labels, 10, scheme, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partitions_are_disjoint_sorted_int64(labels, scheme) -> None:
    parts = partition_indices(labels, 10, scheme)
    together = np.concatenate(parts)
    assert len(np.unique(together)) == len(together)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


def test_iid_covers_every_sample_with_balanced_labels(labels) -> None:
    parts = partition_indices(labels, 10, "iid")
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert [len(p) for p in parts] == [100] * 10
    assert all(len(np.unique(labels[p])) >= 8 for p in parts)  # shuffled, not class shards


def test_dirichlet_small_alpha_skews_label_counts(labels) -> None:
    def mean_top_class_share(alpha: float) -> float:
        parts = partition_indices(labels, 10, "dirichlet", alpha=alpha, min_partition_size=0)
        return float(np.mean([max(label_counts(labels[p], 10)) / len(p) for p in parts if len(p)]))

    assert mean_top_class_share(0.05) > 0.6
    assert mean_top_class_share(100.0) < 0.3


def test_dirichlet_respects_min_partition_size(labels) -> None:
    parts = partition_indices(labels, 10, "dirichlet", alpha=0.3, min_partition_size=40)
    assert min(len(p) for p in parts) >= 40


def test_dirichlet_impossible_min_partition_size_names_the_knobs(labels) -> None:
    with pytest.raises(ValueError, match=r"alpha=0\.5.*min_partition_size=200"):
        partition_indices(labels, 10, "dirichlet", alpha=0.5, min_partition_size=200)


def test_pathological_gives_exactly_k_classes_per_partition(labels) -> None:
    parts = partition_indices(labels, 10, "pathological", classes_per_partition=3)
    assert [len(np.unique(labels[p])) for p in parts] == [3] * 10


def test_label_counts_accepts_tensors_and_arrays() -> None:
    assert label_counts(torch.tensor([0, 2, 2, 3]), 5) == [1, 0, 2, 1, 0]
    assert label_counts(np.array([1, 1]), 3) == [0, 2, 0]
    with pytest.raises(ValueError, match="num_classes=3"):
        label_counts(np.array([3]), 3)


# --- normalisation ----------------------------------------------------------------------------


def test_generator_range_maps_to_normalised_pixel_range() -> None:
    info = dataset_info("cifar10")
    mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    ones = torch.ones(2, 3, 4, 4)
    assert torch.allclose(generator_to_classifier_input(-ones, info), (0 - mean) / std * ones)
    assert torch.allclose(generator_to_classifier_input(ones, info), (1 - mean) / std * ones)


def test_classifier_input_to_pixels_inverts_and_clamps() -> None:
    info = dataset_info("fashion-mnist")
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64) * 2 - 1
    pixels = classifier_input_to_pixels(generator_to_classifier_input(x, info), info)
    assert pixels.dtype == torch.float64
    assert torch.allclose(pixels, (x + 1) / 2)
    assert classifier_input_to_pixels(torch.full((1, 1, 2, 2), 100.0), info).max() == 1


def test_unknown_dataset_names_the_known_ones() -> None:
    assert dataset_names() == ["fashion-mnist", "mnist", "cifar10", "svhn"]
    with pytest.raises(ValueError, match="cifar10"):
        dataset_info("imagenet")


# --- loading ----------------------------------------------------------------------------------


def test_load_fashion_mnist_from_idx_files_is_normalised_and_cached(tmp_path) -> None:
    _write_fashion_mnist(tmp_path)
    images, labels = load_dataset("fashion-mnist", tmp_path, train=True)
    assert images.shape == (40, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [i % 10 for i in range(40)]
    assert images[0, 0, 0, 0].item() == pytest.approx((1 - 0.2860) / 0.3530)
    assert images[0, 0, -1, 0].item() == pytest.approx((0 - 0.2860) / 0.3530)
    assert load_dataset("fashion-mnist", str(tmp_path), train=True)[0] is images
    assert load_dataset("fashion-mnist", tmp_path, train=False)[0].shape == (10, 1, 28, 28)


def test_load_cifar10_from_pickled_batches(tmp_path, monkeypatch) -> None:
    plane = np.full((2, 1024), 0, dtype=np.uint8)
    data = np.concatenate([plane, plane + 255, plane + 51], axis=1)  # R, G, B planes: 0, 1, 0.2
    write_fake_cifar10(tmp_path, monkeypatch, batch=(data, [3, 7]))

    images, labels = load_dataset("cifar10", tmp_path, train=True)
    assert images.shape == (10, 3, 32, 32) and labels.tolist() == [3, 7] * 5
    info = dataset_info("cifar10")
    for channel, pixel in enumerate((0.0, 1.0, 0.2)):
        expected = (pixel - info.mean[channel]) / info.std[channel]
        assert torch.allclose(images[:, channel], torch.tensor(expected), atol=1e-5)


def test_load_svhn_from_mat_files(tmp_path, monkeypatch) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    from torchvision.datasets import SVHN

    pixels = np.zeros((32, 32, 3, 4), dtype=np.uint8)  # SVHN stores HWCN
    pixels[:, :, 1] = 255
    scipy_io.savemat(
        tmp_path / "train_32x32.mat", {"X": pixels, "y": np.array([[10], [1], [2], [3]])}
    )
    md5 = hashlib.md5((tmp_path / "train_32x32.mat").read_bytes()).hexdigest()
    monkeypatch.setitem(SVHN.split_list, "train", [*SVHN.split_list["train"][:2], md5])
    images, labels = load_dataset("svhn", tmp_path, train=True)
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 1, 2, 3]
    assert images[:, 1].min() > images[:, 0].max()


@pytest.mark.parametrize(
    ("name", "folder"), [("fashion-mnist", "FashionMNIST"), ("mnist", "MNIST")]
)
def test_idx_files_read_as_torchvision_reads_them(tmp_path, name, folder) -> None:
    from torchvision import datasets as tv_datasets

    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    for split, n in (("train", 30), ("t10k", 7)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n))
    reader = tv_datasets.FashionMNIST if name == "fashion-mnist" else tv_datasets.MNIST
    for train in (True, False):
        pixels, labels = read_pixels(name, str(tmp_path), train)
        expected = reader(str(tmp_path), train=train, download=False)
        assert pixels.dtype == torch.uint8 and labels.dtype == torch.int64
        assert torch.equal(pixels, expected.data.unsqueeze(1))
        assert torch.equal(labels, expected.targets.long())


def test_a_truncated_or_mismatched_idx_file_is_reported_as_corrupted(tmp_path) -> None:
    _write_fashion_mnist(tmp_path)
    images = tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    whole = images.read_bytes()
    images.write_bytes(whole[:-5])
    with pytest.raises(DatasetNotFoundError, match=r"common\.fetch_data"):
        read_pixels("fashion-mnist", str(tmp_path), train=True)
    write_idx(images, np.zeros((39, 28, 28)))  # one image short of the 40 labels
    with pytest.raises(DatasetNotFoundError, match=r"labels \(40,\)"):
        read_pixels("fashion-mnist", str(tmp_path), train=True)
    assert read_idx(images).shape == (39, 28, 28)


def test_missing_files_say_how_to_fetch_them(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError) as missing:
        load_dataset("fashion-mnist", tmp_path, train=True)
    assert isinstance(missing.value, FileNotFoundError)
    expected = f"python -m common.fetch_data --dataset fashion-mnist --root {tmp_path.resolve()}"
    assert expected in str(missing.value)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path, train=True)


def test_client_partitions_slice_the_train_split(tmp_path) -> None:
    _write_fashion_mnist(tmp_path)
    shards = [load_client_partition("fashion-mnist", tmp_path, pid, 4, "iid") for pid in range(4)]
    assert [len(labels) for _, labels in shards] == [10] * 4
    assert sorted(torch.cat([labels for _, labels in shards]).tolist()) == sorted(
        load_dataset("fashion-mnist", tmp_path, train=True)[1].tolist()
    )
    with pytest.raises(ValueError, match=r"partition_id 4 is out of range .*0\.\.3"):
        load_client_partition("fashion-mnist", tmp_path, 4, 4, "iid")


def _partitions_afresh(root: Path) -> list[list[int]]:
    """Every client's labels of a 4-way Dirichlet split, as a new process would load them."""
    _client_partitions.cache_clear()
    return [
        load_client_partition(
            "fashion-mnist", root, pid, 4, "dirichlet", 1.0, min_partition_size=1
        )[1].tolist()
        for pid in range(4)
    ]


def test_partitions_are_computed_once_per_data_root_and_a_bad_cache_is_recomputed(
    tmp_path, monkeypatch
) -> None:
    _write_fashion_mnist(tmp_path)
    first = _partitions_afresh(tmp_path)
    [cache] = (tmp_path / PARTITION_CACHE).iterdir()

    def no_partitioning(*args, **kwargs):
        raise AssertionError("partitioned again although the split is cached")

    with monkeypatch.context() as patch:
        patch.setattr("common.data.partition_indices", no_partitioning)
        assert _partitions_afresh(tmp_path) == first

    np.savez(cache, p0=np.array([0, 0]), p1=np.array([1]), p2=np.array([2]), p3=np.array([3]))
    assert _partitions_afresh(tmp_path) == first  # rows twice: not a split, so computed again
    cache.write_bytes(b"not a zip file")
    assert _partitions_afresh(tmp_path) == first
    assert _partitions_afresh(tmp_path / ".." / tmp_path.name) == first  # the same root, resolved


def test_a_data_root_the_cache_cannot_be_written_to_still_partitions(tmp_path) -> None:
    _write_fashion_mnist(tmp_path)
    (tmp_path / PARTITION_CACHE).write_text("a file where the cache folder would go")
    first = _partitions_afresh(tmp_path)
    assert _partitions_afresh(tmp_path) == first
    assert (tmp_path / PARTITION_CACHE).is_file()


def test_the_evaluation_subset_is_the_same_for_every_seed_and_keeps_the_split_order() -> None:
    images = torch.arange(100, dtype=torch.float32).view(100, 1, 1, 1)
    labels = torch.arange(100) % 10
    torch.manual_seed(1)
    first_images, first_labels = evaluation_subset(images, labels, 30)
    torch.manual_seed(2)
    again_images, _ = evaluation_subset(images, labels, 30)
    rows = first_images.flatten().long()
    assert torch.equal(first_images, again_images) and len(rows) == 30
    assert torch.equal(rows, rows.sort().values) and len(rows.unique()) == 30
    assert torch.equal(first_labels, labels[rows])
    for whole in (0, 100, 500):
        assert evaluation_subset(images, labels, whole)[0] is images
