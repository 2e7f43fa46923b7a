"""Processes a run leaves behind, found by PID and stopped with their whole tree.

``flwr run`` starts a detached SuperLink that keeps running, with a SuperExec, the simulation
process and Ray under it; killing the SuperLink alone leaves the rest. These helpers read the
process table (Linux ``/proc``), walk trees and sessions, and stop what a run started.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path


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
