"""Run Mosaic (or a baseline) in Flower's simulation runtime with one command; leave nothing up.

    python -m deploy.simulation [--profile conf/X.toml] [--clients N] [--strategy mosaic|fedavg]
                                [--set key=value ...] [--timeout SEC] [--name RUN_NAME]
                                [--flwr-home DIR] [--client-cpus C] [--client-gpus G]
                                [--federation-config "KEY=VALUE ..."]

What it does, in order:

1. Merge the run config: pyproject's ``[tool.flwr.app.config]`` defaults, then the profile, then
   ``--strategy``/``--set``/``--name``. ``--set`` values are TOML literals like ``flwr run -c``
   (``alpha=0.5``, ``run-name="x"``); a value that is not valid TOML is taken as a string
   (``dataset=mnist``). ``results-dir`` defaults to ``$MOSAIC_RESULTS_DIR`` or ``<repo>/results``,
   ``data-root`` to ``$MOSAIC_DATA_ROOT`` or ``<repo>/data`` (both made absolute: the SuperLink
   runs the app from another folder), ``run-name`` to ``<strategy>-<profile stem>-<timestamp>``.
2. Validate it with :func:`server_app.strategies.validate_run_config`, check ``min-nodes <=
   --clients``, the device and that the dataset is on disk, before anything starts: a bad
   config exits 2 with a message naming the key.
3. ``flwr run <repo> --stream`` with the overrides in one temporary TOML. ``flwr run`` starts a
   detached local SuperLink; it gets free ports (so it never talks to somebody else's SuperLink)
   and ``FLWR_HOME`` = ``--flwr-home`` (default ``<repo>/.flwr``; one simulation at a time per
   FLWR_HOME, as they would share its SQLite state). Resources per ClientApp (Ray's, which
   bound how many run at once): ``--client-cpus`` (default one CPU); ``--client-gpus``, by
   default none unless the run's ``device`` resolves to CUDA, then ``1/N`` of one GPU (floored
   to 0.01, at least 0.01), so all N clients may share it and the CPUs bound the concurrency.
   ``--federation-config`` passes further pairs through to Flower as they are (e.g.
   ``init-args-num-cpus=8``); a key given there wins.
4. Ask ``flwr ls`` for the run's status: ``flwr run --stream`` exits 0 even when the run failed.
5. Always (also on Ctrl-C, SIGTERM, a timeout) stop that SuperLink and everything it spawned
   (SuperExec, flwr-simulation, Ray), found by PID through ``psutil``.
6. Print the final report from ``<results-dir>/<run-name>/`` (``server_app.results``).

Exit status: 0 run completed, 1 run failed, 2 invalid config or missing data, 124 timed out,
128 + signal number when interrupted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import get_args

import tomli_w  # a dependency of flwr

from common.config import ConfigError, Strategy
from deploy.flwr_cli import (
    EXIT_CONFIG,
    flower_env,
    guarded_run,
    report_run_end,
    run_status,
    stream_flwr_run,
)
from deploy.processes import (
    find_local_superlinks,
    free_ports,
    list_processes,
    stop_local_superlink,
)
from deploy.run_config import REPO, build_run_config, check_runnable, federation_config
from server_app.results import RunResults

DEFAULT_CLIENTS = 10


# --- report -----------------------------------------------------------------------------------


def print_report(folder: Path) -> None:
    """The numbers a user looks for first, read back from the results folder."""
    print("\n==== final report ====")
    for line in RunResults.read(folder).summary_lines():
        print(line)


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.simulation",
        description="Run Mosaic in Flower's simulation runtime and print a final report.",
    )
    parser.add_argument("--profile", type=Path, help="a run-config TOML, e.g. conf/quick.toml")
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS, help="SuperNodes")
    parser.add_argument("--strategy", choices=get_args(Strategy))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run-config key (TOML literal); repeatable",
    )
    parser.add_argument("--timeout", type=float, help="stop the run after SEC seconds")
    parser.add_argument("--name", help="run name: the results folder's name")
    parser.add_argument(
        "--flwr-home", type=Path, default=REPO / ".flwr", help="FLWR_HOME (default: <repo>/.flwr)"
    )
    parser.add_argument(
        "--client-cpus", type=int, default=1, help="CPUs Ray reserves per ClientApp"
    )
    parser.add_argument(
        "--client-gpus",
        type=float,
        help="GPUs Ray reserves per ClientApp (default: 1/clients of one GPU when the device "
        "is CUDA, else 0)",
    )
    parser.add_argument(
        "--federation-config",
        action="append",
        default=[],
        metavar="KEY=VALUE ...",
        help="more of flwr run's federation config, passed through; repeatable",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides, cfg = build_run_config(args.profile, args.strategy, args.set, args.name)
        device = check_runnable(cfg, args.clients)
        federation = federation_config(
            args.clients, device, args.client_cpus, args.client_gpus, args.federation_config
        )
    except (ConfigError, OSError, tomllib.TOMLDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG

    flwr = str(Path(sys.executable).with_name("flwr"))
    if not Path(flwr).is_file():
        print(f"error: no {flwr}: install the project first (make setup)", file=sys.stderr)
        return EXIT_CONFIG
    flwr_home = args.flwr_home.expanduser().resolve()
    if busy := find_local_superlinks(list_processes(), flwr_home):
        print(
            f"error: FLWR_HOME {flwr_home} is in use by the SuperLink of another simulation "
            f"(PID {', '.join(map(str, busy))}): pass --flwr-home DIR to run beside it, or stop "
            "it (kill PID) if it is left over",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    flwr_home.mkdir(parents=True, exist_ok=True)
    http_port, control_port = free_ports(2)
    env = flower_env(flwr_home, http_port, control_port)
    folder = Path(cfg.results_dir) / cfg.run_name
    print(
        f"Running {cfg.strategy} on {cfg.dataset} with {args.clients} clients "
        f"(profile: {args.profile or 'none'})\n  results:   {folder}\n  data:      {cfg.data_root}"
        f"\n  FLWR_HOME: {flwr_home} (SuperLink on 127.0.0.1:{http_port}, log in "
        f"{flwr_home / 'local-superlink' / 'superlink.log'})",
        flush=True,
    )

    log = flwr_home / "local-superlink" / "superlink.log"
    with tempfile.TemporaryDirectory(prefix="mosaic-run-config-") as scratch:
        run_config = Path(scratch) / "run-config.toml"
        run_config.write_text(tomli_w.dumps(overrides))
        command = [flwr, "run", str(REPO), "--stream", "--run-config", str(run_config)]
        command += ["--federation-config", federation]
        print("$ " + " ".join(command), flush=True)
        started = time.monotonic()
        stop = lambda: stop_local_superlink(flwr_home, http_port)  # noqa: E731
        with guarded_run("simulation", args.timeout, stop) as early:
            run_id = stream_flwr_run(command, env, args.timeout)
            status, details = run_status(flwr, env, run_id)
    if early.code is not None:
        return early.code
    if code := report_run_end(run_id, status, details, log, time.monotonic() - started):
        return code
    print_report(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
