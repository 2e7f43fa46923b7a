#!/usr/bin/env bash
# Run the docker-compose demo for real, as tests/test_compose.py does it, on a machine that
# cannot pull Flower's official images (Docker Hub unreachable): set up a Docker engine if none
# runs (Debian's docker.io, as root), make the stand-in image from Debian's mirror with
# debootstrap (deploy/compose/standin.yaml), then run the test: TLS, node authentication, three
# sites of widths 1, 1/2 and 1/4, Mosaic on conf/quick-tiers.toml, results checked, all removed.
#
#   scripts/compose_demo.sh        (or: make compose-test)
#
# Environment: MOSAIC_STANDIN_IMAGE (default mosaic-standin:bookworm), DEBIAN_MIRROR (default:
# the first URI of this machine's apt sources, else deb.debian.org).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
image="${MOSAIC_STANDIN_IMAGE:-mosaic-standin:bookworm}"
say() { printf '==> %s\n' "$*"; }

if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null 2>&1; then
    say "installing Debian's docker.io (needs root and apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io
  fi
  say "starting dockerd (log: /tmp/mosaic-dockerd.log)"
  nohup dockerd >/tmp/mosaic-dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "error: dockerd did not start, see /tmp/mosaic-dockerd.log" >&2; exit 1; }
fi

if ! docker image inspect "$image" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null 2>&1 || {
    say "installing debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
  }
  mirror="${DEBIAN_MIRROR:-$(grep -hoE '^URIs: *\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | awk '{print $2}')}"
  mirror="${mirror:-http://deb.debian.org/debian}"
  root="$(mktemp -d)"
  say "making $image from $mirror (debootstrap, about a minute)"
  debootstrap --variant=minbase --include=python3,ca-certificates bookworm "$root" "$mirror" >/dev/null
  tar -C "$root" -c . | docker import - "$image" >/dev/null
  rm -rf "$root"
fi

cd "$repo"
bash scripts/setup.sh
say "running the compose demo (tests/test_compose.py)"
MOSAIC_STANDIN_IMAGE="$image" .venv/bin/python -m pytest -q -rs tests/test_compose.py
