#!/usr/bin/env bash
# Set up a clone for running and testing Mosaic: .venv (Python 3.11), the project with its dev
# tools (pip install -e ".[dev]"), and the datasets. Safe to run again: it reinstalls only when
# pyproject.toml changed and fetches only missing data.
#
#   scripts/setup.sh            (or: make setup)
#
# Environment:
#   PYTHON               interpreter for a new .venv (default: python3.11)
#   MOSAIC_DATA_ROOT     where the datasets go (default: <repo>/data; deploy.simulation reads it)
#   MOSAIC_DATASETS_DIR  a folder holding fashion-mnist/ and mnist/ IDX files to copy from
#                        (default: ../shared/datasets beside the repo, when it exists)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3.11}"
venv="$repo/.venv"
stamp="$venv/.mosaic-installed-pyproject.sha256"
data_root="${MOSAIC_DATA_ROOT:-$repo/data}"
shared_datasets="$(cd "$repo/.." && pwd)/shared/datasets"

say() { printf '==> %s\n' "$*"; }

# 1. The virtual environment.
if [[ -x "$venv/bin/python" ]]; then
  say "using $venv ($("$venv/bin/python" --version))"
else
  if ! command -v "$python" >/dev/null 2>&1; then
    echo "error: $python not found. Mosaic needs Python 3.11 (flwr 1.42 wants >= 3.11, the" \
      "torch pin is built for 3.11): install it, or set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
  say "creating $venv with $("$python" --version)"
  rm -rf "$venv"  # a half-made one from an interrupted run
  if ! "$python" -m venv "$venv"; then
    # Debian/Ubuntu without python3.11-venv have no ensurepip: bring pip in from outside.
    say "venv could not install pip; bootstrapping it with $python -m pip"
    rm -rf "$venv"
    "$python" -m venv --without-pip "$venv"
    if ! "$python" -m pip --python "$venv/bin/python" install --quiet pip; then
      echo "error: could not put pip into $venv: install python3.11-venv (apt) and retry" >&2
      exit 1
    fi
  fi
fi

# 2. The project and its dependencies, when pyproject.toml changed since the last install.
wanted="$("$venv/bin/python" -c \
  'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
  pyproject.toml)"
if [[ -f "$stamp" && "$(<"$stamp")" == "$wanted" ]]; then
  say "project already installed (pyproject.toml unchanged)"
else
  say "installing the project and its dev tools: pip install -e \".[dev]\""
  "$venv/bin/python" -m pip install -e ".[dev]"
  printf '%s\n' "$wanted" >"$stamp"
fi

# 3. The datasets (Fashion-MNIST and MNIST), into the data root.
fetch=(-m common.fetch_data --root "$data_root")
if [[ -z "${MOSAIC_DATASETS_DIR:-}" && -d "$shared_datasets" ]]; then
  fetch+=(--from-dir "$shared_datasets")
fi
say "fetching datasets into $data_root"
"$venv/bin/python" "${fetch[@]}"
say "setup done"
