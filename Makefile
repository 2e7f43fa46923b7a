# Mosaic on Flower: one command to set up and run, one to set up and test.
#
#   make run                      set up, then run the default profile in Flower simulation
#   make run-fedavg               the same run with the FedAvg baseline
#   make test                     set up, then run the test suite
#   make test-unit                set up, then the unit tests only (about a minute)
#   make bench                    set up, then the quick benchmark suite (docs/results.md)
#   make speed                    set up, then the speed benchmark (docs/speed.md)
#   make gpu-check                on a GPU machine: the CUDA tests, the speed benchmark, the speed cells
#
# Variables (make VAR=value ...):
#   PROFILE   run-config profile              (default: conf/fmnist-dir0.1.toml)
#   CLIENTS   number of simulated clients     (default: 10)
#   ARGS      more deploy.simulation options, e.g. ARGS='--set num-rounds=3 --name try1'
#   PYTEST_ARGS  options for pytest, e.g. PYTEST_ARGS='-k config'
#   TEST_WORKERS pytest-xdist workers for make test / test-unit (default: auto, one per core)
#   SUITE     benchmark suite, quick or full  (default: quick); BENCH_ARGS e.g. "--cells '*-s0'"
# Environment read by the scripts: MOSAIC_DATA_ROOT (default: ./data), PYTHON (default:
# python3.11, for a new .venv), MOSAIC_DATASETS_DIR (a local copy of the dataset files).

PROFILE ?= conf/fmnist-dir0.1.toml
CLIENTS ?= 10
ARGS ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= auto
SUITE ?= quick
BENCH_ARGS ?=
PY := .venv/bin/python

.PHONY: setup run run-fedavg test test-unit bench speed gpu-check compose-test lint clean-results

setup:
	bash scripts/setup.sh

run: setup
	$(PY) -m deploy.simulation --profile $(PROFILE) --clients $(CLIENTS) $(ARGS)

run-fedavg: setup
	$(PY) -m deploy.simulation --profile $(PROFILE) --clients $(CLIENTS) --strategy fedavg $(ARGS)

# --maxschedchunk 1: tests go to whichever worker is free, one at a time, so two long
# real-process runs do not queue on one worker while the other idles.
XDIST := -n $(TEST_WORKERS) --maxschedchunk 1

test: setup
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -q -m unit $(XDIST) $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks --suite $(SUITE) $(BENCH_ARGS)

speed: setup
	$(PY) -m benchmarks.speed --profile $(PROFILE) --clients $(CLIENTS)

# The speed cells train every client afresh (no reply cache): GPU, then the same cell on the CPUs.
SPEED_CELLS := 'one-shot-fashion-mnist-a0.1-n5-mosaic-s0'
gpu-check: setup
	$(PY) -m pytest -q tests/test_cuda.py tests/test_distill.py tests/test_meta.py
	$(PY) -m benchmarks.speed --part teacher kd --device cuda
	$(PY) -m benchmarks.speed --part run --set device=cuda
	$(PY) -m benchmarks --suite full --no-reply-cache --force --device cuda --cells $(SPEED_CELLS)
	$(PY) -m benchmarks --suite full --no-reply-cache --force --device cpu --cells $(SPEED_CELLS) \
		--out benchmarks/results/speed-cpu

# The docker-compose demo for real, with stand-in images (sets up a Docker engine if none runs).
compose-test:
	bash scripts/compose_demo.sh

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean-results:
	rm -rf results
