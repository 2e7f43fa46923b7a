# Mosaic on Flower: one command to set up and run, one to set up and test.
#
#   make run                      set up, then run the default profile in Flower simulation
#   make run-fedavg               the same run with the FedAvg baseline
#   make test                     set up, then run the test suite
#   make bench                    set up, then the quick benchmark suite (docs/results.md)
#
# Variables (make VAR=value ...):
#   PROFILE   run-config profile              (default: conf/fmnist-dir0.1.toml)
#   CLIENTS   number of simulated clients     (default: 10)
#   ARGS      more deploy.simulation options, e.g. ARGS='--set num-rounds=3 --name try1'
#   PYTEST_ARGS  options for pytest, e.g. PYTEST_ARGS='-k config'
#   SUITE     benchmark suite, quick or full  (default: quick); BENCH_ARGS e.g. "--cells '*-s0'"
# Environment read by the scripts: MOSAIC_DATA_ROOT (default: ./data), PYTHON (default:
# python3.11, for a new .venv), MOSAIC_DATASETS_DIR (a local copy of the dataset files).

PROFILE ?= conf/fmnist-dir0.1.toml
CLIENTS ?= 10
ARGS ?=
PYTEST_ARGS ?=
SUITE ?= quick
BENCH_ARGS ?=
PY := .venv/bin/python

.PHONY: setup run run-fedavg test bench lint clean-results

setup:
	bash scripts/setup.sh

run: setup
	$(PY) -m deploy.simulation --profile $(PROFILE) --clients $(CLIENTS) $(ARGS)

run-fedavg: setup
	$(PY) -m deploy.simulation --profile $(PROFILE) --clients $(CLIENTS) --strategy fedavg $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks --suite $(SUITE) $(BENCH_ARGS)

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean-results:
	rm -rf results
