"""Driving Flower's CLI: its environment, ``flwr run --stream``, the run's status, and a guard
that turns timeouts, failures and signals into exit codes after cleaning up.

``flwr run --stream`` exits 0 even when the run failed, so :func:`run_status` asks ``flwr ls``.
Exit codes: 0 completed, 1 failed, 2 invalid config or missing data, 124 timed out, 128 + signal
number when interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from deploy.run_config import REPO

COMPLETED = "finished:completed"
EXIT_FAILED, EXIT_CONFIG, EXIT_TIMEOUT = 1, 2, 124
RUN_ID_PATTERN = re.compile(r"Successfully started run (\d+)")


class RunInterruptedError(Exception):
    """SIGINT/SIGTERM arrived: unwind through the cleanup, then exit 128 + signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
