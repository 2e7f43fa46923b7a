"""Processes a run leaves behind, found by PID and stopped with their whole tree.

``flwr run`` starts a detached SuperLink that keeps running, with a SuperExec, the simulation
process and Ray under it; killing the SuperLink alone leaves the rest. These helpers read the
process table (``psutil``: Linux, macOS and Windows alike), walk trees and sessions (POSIX; on
Windows parent links alone), and stop what a run started.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

NO_SESSION = -1  # where the OS has no sessions (Windows), or the process's is not ours to read


@dataclass(frozen=True)
class Process:
    """One row of the process table: enough to walk trees and sessions and to spot a reused
    PID (same number, another start time)."""

    pid: int
    ppid: int
    session: int
    zombie: bool
    started: float  # creation time, seconds since the epoch
    args: tuple[str, ...]


def _session(pid: int) -> int:
    try:
        return os.getsid(pid)
    except (AttributeError, OSError):  # no sessions on this OS; gone; not ours
        return NO_SESSION


def list_processes() -> dict[int, Process]:
    """Every process this user can see, by PID."""
    table = {}
    for proc in psutil.process_iter(["ppid", "status", "create_time", "cmdline"]):
        info = proc.info
        if info["ppid"] is None or info["create_time"] is None:  # gone, or not ours to read
            continue
        table[proc.pid] = Process(
            pid=proc.pid,
            ppid=info["ppid"],
            session=_session(proc.pid),
            zombie=info["status"] == psutil.STATUS_ZOMBIE,
            started=info["create_time"],
            args=tuple(info["cmdline"] or ()),
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
    own_session = _session(0)
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
    targets = {pid: table[pid].started for pid in process_tree(table, roots)}
    sessions = {pid for pid in targets if table[pid].session == pid} - {_session(0)}

    def alive() -> list[int]:
        now = list_processes()
        live = {
            pid for pid, started in targets.items() if pid in now and now[pid].started == started
        }
        for proc in now.values():
            if proc.pid not in targets and (proc.session in sessions or proc.ppid in live):
                targets[proc.pid] = proc.started
                live.add(proc.pid)
        live.discard(os.getpid())
        return sorted(pid for pid in live if not now[pid].zombie)

    def signal_and_wait(
        pids: list[int], kill: bool, wait: float, until_gone: set[int] | None = None
    ) -> list[int]:
        """Signal ``pids``; wait until ``until_gone`` (default: the whole tree) has exited."""
        for pid in pids:  # terminate: SIGTERM (TerminateProcess on Windows); kill: SIGKILL
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                if process.create_time() == targets.get(pid, process.create_time()):
                    process.kill() if kill else process.terminate()
        deadline = time.monotonic() + wait

        def waiting(left: list[int]) -> bool:
            return bool(left if until_gone is None else until_gone.intersection(left))

        while waiting(left := alive()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    # The roots first, so each can stop its own children in order; once they are gone, what
    # they leave (a SuperExec that would notice its parent's death only on its next poll) is
    # signalled at once rather than waited for.
    left = signal_and_wait(roots, kill=False, wait=min(grace, 3.0), until_gone=set(roots))
    if left:
        left = signal_and_wait(left, kill=False, wait=grace)
    if left:
        left = signal_and_wait(left, kill=True, wait=grace)
    return left


def stop_local_superlink(flwr_home: Path, port: int) -> None:
    """Stop the SuperLink of this FLWR_HOME and port, with its SuperExec, simulation and Ray."""
    roots = find_local_superlinks(list_processes(), flwr_home, port)
    if not roots:
        return
    survivors = stop_processes(roots)
    if survivors:
        print(f"warning: could not stop processes {survivors}", file=sys.stderr)
    else:
        print(f"Stopped the local SuperLink (PID {', '.join(map(str, roots))}) and its children")


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
