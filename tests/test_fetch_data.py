"""The fetch CLI on tiny fake IDX files; registries and the network are never touched."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from common import fetch_data
from common.data import load_dataset
from common.fetch_data import FetchError, main, verify_idx_folder


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = (0x08 << 8) | array.ndim  # uint8 data
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def _write_gz_dataset(folder: Path, n_train: int = 6, n_test: int = 4) -> Path:
    """The four gzip IDX files of a tiny MNIST-shaped dataset, as the registries ship them."""
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = np.random.default_rng(n).integers(0, 256, (n, 28, 28))
        for name, array in (("images-idx3", images), ("labels-idx1", np.arange(n) % 10)):
            (folder / f"{split}-{name}-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    return folder


@pytest.fixture(autouse=True)
def _no_registry_or_network(monkeypatch) -> None:
    """Every source but the local folder fails, as on a machine without registries or internet."""
    monkeypatch.delenv(fetch_data.ENV_DIR, raising=False)
    for source in ("from_debian", "from_npm", "from_torchvision"):

        def unavailable(dataset: str, scratch: Path, source: str = source) -> Path:
            raise FetchError(f"{source} is switched off in tests")

        monkeypatch.setattr(fetch_data, source, unavailable)


def test_from_dir_writes_torchvision_layout_that_loads(tmp_path) -> None:
    source = _write_gz_dataset(tmp_path / "src")
    main(
        ["--root", str(tmp_path / "data"), "--dataset", "fashion-mnist", "--from-dir", str(source)]
    )
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    for name in fetch_data.IDX_FILES:
        assert (raw / name).is_file() and (raw / f"{name}.gz").is_file()
    assert verify_idx_folder(raw) == {"train": 6, "t10k": 4}
    images, labels = load_dataset("fashion-mnist", tmp_path / "data", train=True)
    assert images.shape == (6, 1, 28, 28) and labels.tolist() == list(range(6))


def test_env_dir_holding_dataset_subfolders_is_a_source(tmp_path, monkeypatch) -> None:
    _write_gz_dataset(tmp_path / "shared" / "mnist")
    monkeypatch.setenv(fetch_data.ENV_DIR, str(tmp_path / "shared"))
    main(["--root", str(tmp_path / "data"), "--dataset", "mnist"])
    assert verify_idx_folder(tmp_path / "data" / "MNIST" / "raw") == {"train": 6, "t10k": 4}


def test_second_run_does_nothing(tmp_path) -> None:
    source = _write_gz_dataset(tmp_path / "src")
    assert fetch_data.fetch("mnist", tmp_path / "data", source) == f"folder {source}"
    written = tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    before = written.stat().st_mtime_ns
    assert fetch_data.fetch("mnist", tmp_path / "data", from_dir=None) == "already present"
    assert written.stat().st_mtime_ns == before


def test_truncated_file_is_rejected_and_nothing_is_written(tmp_path) -> None:
    source = _write_gz_dataset(tmp_path / "src")
    broken = source / "train-images-idx3-ubyte.gz"
    broken.write_bytes(gzip.compress(gzip.decompress(broken.read_bytes())[:-100]))
    with pytest.raises(FetchError, match="truncated"):
        fetch_data.fetch("mnist", tmp_path / "data", source)
    assert not (tmp_path / "data" / "MNIST" / "raw").exists()


def test_image_and_label_counts_must_agree(tmp_path) -> None:
    source = _write_gz_dataset(tmp_path / "src")
    (source / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.arange(3))))
    with pytest.raises(FetchError, match="4 images but 3 labels"):
        fetch_data.fetch("mnist", tmp_path / "data", source)


def test_total_failure_exits_nonzero_listing_sources_and_remedy(tmp_path) -> None:
    with pytest.raises(SystemExit) as failed:
        main(["--root", str(tmp_path / "data"), "--dataset", "fashion-mnist"])
    message = str(failed.value.code)
    assert "Debian package dataset-fashion-mnist" in message
    assert "torchvision download" in message
    assert "--from-dir DIR" in message
