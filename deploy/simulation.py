"""Run Mosaic (or a baseline) in Flower's simulation runtime with one command; leave nothing up.

    python -m deploy.simulation [--profile conf/X.toml] [--clients N] [--strategy mosaic|fedavg]
                                [--set key=value ...] [--timeout SEC] [--name RUN_NAME]
                                [--flwr-home DIR]

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
   FLWR_HOME, as they would share its SQLite state). Resources per ClientApp: one CPU; no GPU
   unless the run's ``device`` resolves to CUDA, then ``1/N`` of one GPU (floored to 0.01, at
   least 0.01), so all N clients may share it and the CPUs bound the concurrency.
4. Ask ``flwr ls`` for the run's status: ``flwr run --stream`` exits 0 even when the run failed.
5. Always (also on Ctrl-C, SIGTERM, a timeout) stop that SuperLink and everything it spawned
   (SuperExec, flwr-simulation, Ray), found by PID through ``/proc`` (Linux).
6. Print the final report from ``<results-dir>/<run-name>/`` (``server_app.results``).

Exit status: 0 run completed, 1 run failed, 2 invalid config or missing data, 124 timed out,
128 + signal number when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import tomli_w  # a dependency of flwr
import torch

from common.config import ConfigError, RunConfig, Strategy, parse_run_config, pyproject_defaults
from common.data import DatasetNotFoundError, load_dataset
from common.train import resolve_device
from server_app.results import RunResults
from server_app.strategies import validate_run_config

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CLIENTS = 10
COMPLETED = "finished:completed"
EXIT_FAILED, EXIT_CONFIG, EXIT_TIMEOUT = 1, 2, 124
RUN_ID_PATTERN = re.compile(r"Successfully started run (\d+)")


class RunInterruptedError(Exception):
    """SIGINT/SIGTERM arrived: unwind through the cleanup, then exit 128 + signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- run config -------------------------------------------------------------------------------


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """``["alpha=0.5", "dataset=mnist"]`` -> ``{"alpha": 0.5, "dataset": "mnist"}``."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            value = tomllib.loads(f"value = {raw}")["value"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word: dataset=mnist means the string "mnist"
        overrides[key.strip()] = value
    return overrides


def _absolute(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def build_run_config(
    profile: Path | None, strategy: str | None, sets: Iterable[str], name: str | None
) -> tuple[dict[str, Any], RunConfig]:
    """The overrides to hand to ``flwr run`` and the validated config they make.

    Raises :class:`ConfigError` (naming the key) for anything Flower or the ServerApp would
    reject later.
    """
    overrides: dict[str, Any] = {}
    if profile is not None:
        with profile.open("rb") as handle:
            overrides.update(tomllib.load(handle))
    if strategy is not None:
        overrides["strategy"] = strategy
    overrides.update(parse_set(sets))
    if name is not None:
        overrides["run-name"] = name
    defaults = pyproject_defaults(REPO / "pyproject.toml")
    cfg = parse_run_config({**defaults, **overrides})  # types first, then fill in the paths

    overrides["results-dir"] = _absolute(
        cfg.results_dir or os.environ.get("MOSAIC_RESULTS_DIR") or REPO / "results"
    )
    overrides["data-root"] = _absolute(
        cfg.data_root or os.environ.get("MOSAIC_DATA_ROOT") or REPO / "data"
    )
    if not cfg.run_name:
        stem = profile.stem if profile is not None else "defaults"
        overrides["run-name"] = f"{cfg.strategy}-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return overrides, validate_run_config({**defaults, **overrides})


def check_runnable(cfg: RunConfig, clients: int) -> torch.device:
    """What the schema cannot know: the client count, the device, the data; return the device."""
    if clients < 1:
        raise ConfigError(f"--clients: {clients} is not a positive number of clients")
    if cfg.min_nodes > clients:
        raise ConfigError(
            f"min-nodes: {cfg.min_nodes} is more than the {clients} clients (--clients), so "
            "the first round would wait forever; lower min-nodes or raise --clients"
        )
    try:
        device = resolve_device(cfg.device)
    except RuntimeError as error:
        raise ConfigError(f"device: {error}") from None
    try:
        load_dataset(cfg.dataset, cfg.data_root, train=False)
    except (DatasetNotFoundError, ImportError) as error:
        raise ConfigError(f"data-root: {error}") from None
    return device


def client_gpus(device: torch.device, clients: int) -> float:
    """Ray's GPU share per ClientApp (see the module docstring)."""
    if device.type != "cuda":
        return 0.0
    return max(0.01, math.floor(100 / clients) / 100)


# --- processes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    """One row of /proc: enough to walk trees and sessions and to spot a reused PID."""

    pid: int
    ppid: int
    session: int
    state: str
    start_ticks: int
    args: tuple[str, ...]


def list_processes() -> dict[int, Process]:
    """Every process this user can see (Linux /proc), by PID."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the name in (...) may hold spaces
        table[int(entry.name)] = Process(
            pid=int(entry.name),
            ppid=int(fields[1]),
            session=int(fields[3]),
            state=fields[0],
            start_ticks=int(fields[19]),
            args=tuple(arg.decode(errors="replace") for arg in args if arg),
        )
    return table


def find_local_superlinks(
    table: Mapping[int, Process], flwr_home: Path, port: int | None = None
) -> list[int]:
    """The SuperLinks that ``flwr run`` started for this FLWR_HOME (and this port, if given)."""
    database = str(flwr_home / "local-superlink" / "state.db")
    found = []
    for proc in table.values():
        args = proc.args
        if (
            any(arg.endswith("flower-superlink") for arg in args[:2])
            and database in args
            and (port is None or ("--port", str(port)) in itertools.pairwise(args))
        ):
            found.append(proc.pid)
    return found


def process_tree(table: Mapping[int, Process], roots: Iterable[int]) -> set[int]:
    """``roots``, their descendants, and every process in a session one of them leads.

    The SuperLink and its SuperExec each start their own session; Ray's processes stay in the
    SuperExec's session even when their parent dies, so sessions catch what parent links miss.
    """
    members = {pid for pid in roots if pid in table}
    own_session = os.getsid(0)
    while True:
        sessions = {pid for pid in members if table[pid].session == pid} - {own_session}
        grown = members | {
            proc.pid for proc in table.values() if proc.ppid in members or proc.session in sessions
        }
        grown.discard(os.getpid())
        if grown == members:
            return members
        members = grown


def stop_processes(roots: list[int], grace: float = 10.0) -> list[int]:
    """SIGTERM the roots, then what is left of their tree, then SIGKILL; return survivors.

    The tree is re-read on every check, so a process spawned during the teardown is caught too.
    Killing the SuperLink alone is not enough: flwr-simulation and Ray keep running without it.
    """
    table = list_processes()
    targets = {pid: table[pid].start_ticks for pid in process_tree(table, roots)}
    sessions = {pid for pid in targets if table[pid].session == pid} - {os.getsid(0)}

    def alive() -> list[int]:
        now = list_processes()
        live = {
            pid for pid, ticks in targets.items() if pid in now and now[pid].start_ticks == ticks
        }
        for proc in now.values():
            if proc.pid not in targets and (proc.session in sessions or proc.ppid in live):
                targets[proc.pid] = proc.start_ticks
                live.add(proc.pid)
        live.discard(os.getpid())
        return sorted(pid for pid in live if now[pid].state != "Z")

    def signal_and_wait(pids: list[int], signum: int, wait: float) -> list[int]:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + wait
        while (left := alive()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    left = signal_and_wait(roots, signal.SIGTERM, wait=min(grace, 3.0))
    if left:
        left = signal_and_wait(left, signal.SIGTERM, wait=grace)
    if left:
        left = signal_and_wait(left, signal.SIGKILL, wait=grace)
    return left


def stop_local_superlink(flwr_home: Path, port: int) -> None:
    """Stop the SuperLink of this FLWR_HOME and port, with its SuperExec, simulation and Ray."""
    if not Path("/proc").is_dir():
        print(
            f"warning: no /proc here: stop the flower-superlink on port {port} yourself",
            file=sys.stderr,
        )
        return
    roots = find_local_superlinks(list_processes(), flwr_home, port)
    if not roots:
        return
    survivors = stop_processes(roots)
    if survivors:
        print(f"warning: could not stop processes {survivors}", file=sys.stderr)
    else:
        print(f"Stopped the local SuperLink (PID {', '.join(map(str, roots))}) and its children")


# --- flwr -------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def flower_env(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
    """The environment for ``flwr``: private home and ports, no telemetry, no ``uv sync``."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        RAY_ADDRESS="local",  # a fresh Ray for this run, never a cluster left by `ray start`
        PYTHONUNBUFFERED="1",  # stream the logs line by line through our pipe
        # `flwr run` starts `flower-superlink` (which starts the rest) from PATH: use this venv's.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return env


def run_status(flwr: str, env: Mapping[str, str], run_id: str | None) -> tuple[str, str]:
    """(status, details) of the run from ``flwr ls --format json``; waits for it to finish."""
    command = [flwr, "ls", "--format", "json"] + (["--run-id", run_id] if run_id else [])
    status, details = "unknown", "flwr ls gave no answer"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            result = subprocess.run(
                command, env=env, cwd=REPO, capture_output=True, text=True, timeout=30
            )
            runs = json.loads(result.stdout)["runs"]
        except (subprocess.TimeoutExpired, json.JSONDecodeError, KeyError) as error:
            details = f"flwr ls: {error}"
            time.sleep(1)
            continue
        if runs:
            latest = max(runs, key=lambda run: run["pending-at"])
            status, details = latest["status"], latest.get("status-details", "")
            if status.startswith("finished"):
                break
        time.sleep(1)
    return status, details


def stream_flwr_run(command: list[str], env: Mapping[str, str], timeout: float | None) -> str:
    """Run ``flwr run --stream``, echoing its output; return the run id (or "" if none)."""
    process = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run_ids: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if not run_ids and (match := RUN_ID_PATTERN.search(line)):
                run_ids.append(match.group(1))

    echo = threading.Thread(target=pump, daemon=True)
    echo.start()
    try:
        returncode = process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        echo.join(timeout=5)
    if returncode != 0:
        raise subprocess.CalledProcessError(returncode, command)
    return run_ids[0] if run_ids else ""


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
    return parser.parse_args(argv)


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise RunInterruptedError(signum)


INTERRUPTING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class RunExit:
    """How a guarded run ended early: the exit code, or None while nothing went wrong."""

    code: int | None = None


@contextlib.contextmanager
def guarded_run(what: str, timeout: float | None, cleanup: Callable[[], None]) -> Iterator[RunExit]:
    """Run the body with Ctrl-C/SIGTERM/SIGHUP turned into an orderly stop, then ``cleanup()``.

    A timeout, a failed ``flwr run`` or a signal is printed and becomes ``RunExit.code`` (124,
    1, 128 + signal) instead of a traceback; during ``cleanup`` further signals are ignored,
    so the processes the body started are always stopped. The previous handlers are back
    afterwards. ``what`` names what is stopped.
    """
    previous = {signum: signal.getsignal(signum) for signum in INTERRUPTING_SIGNALS}
    for signum in INTERRUPTING_SIGNALS:
        signal.signal(signum, _raise_interrupted)
    outcome = RunExit()
    try:
        yield outcome
    except subprocess.TimeoutExpired:
        print(f"error: the run took longer than --timeout {timeout:g} s", file=sys.stderr)
        outcome.code = EXIT_TIMEOUT
    except subprocess.CalledProcessError as error:
        print(f"error: flwr run exited with {error.returncode}", file=sys.stderr)
        outcome.code = EXIT_FAILED
    except RunInterruptedError as interrupt:
        print(f"\nInterrupted ({interrupt}): stopping the {what}", file=sys.stderr)
        outcome.code = 128 + interrupt.signum
    finally:
        for signum in INTERRUPTING_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)  # let the cleanup finish
        try:
            cleanup()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def report_run_end(
    run_id: int | None, status: str, details: str, log: Path, seconds: float, note: str = ""
) -> int:
    """Print how the run ended (pointing at ``log`` if it did not complete); its exit code."""
    if status != COMPLETED:
        print(
            f"error: run {run_id or '?'} ended as {status!r} ({details}). See the log above and "
            f"{log}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"Run {run_id} {status} in {seconds:.0f} s{note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides, cfg = build_run_config(args.profile, args.strategy, args.set, args.name)
        device = check_runnable(cfg, args.clients)
    except (ConfigError, OSError, tomllib.TOMLDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG

    flwr = str(Path(sys.executable).with_name("flwr"))
    if not Path(flwr).is_file():
        print(f"error: no {flwr}: install the project first (make setup)", file=sys.stderr)
        return EXIT_CONFIG
    flwr_home = args.flwr_home.expanduser().resolve()
    if Path("/proc").is_dir() and (busy := find_local_superlinks(list_processes(), flwr_home)):
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
    federation = (
        f"num-supernodes={args.clients} client-resources-num-cpus=1 "
        f"client-resources-num-gpus={client_gpus(device, args.clients)}"
    )
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
