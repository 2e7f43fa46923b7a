"""The process helpers the launchers clean up with: a real process tree, found and stopped."""

import subprocess
import sys
import time
from pathlib import Path

import psutil

from deploy.processes import (
    Process,
    find_local_superlinks,
    list_processes,
    process_tree,
    stop_processes,
)

PARENT = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"
)


def test_a_process_tree_in_its_own_session_is_found_and_stopped_with_its_children() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (children := psutil.Process(parent.pid).children()):
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.1)
        table = list_processes()
        assert table[parent.pid].args[0] == sys.executable and not table[parent.pid].zombie
        assert {parent.pid, children[0].pid} <= process_tree(table, [parent.pid])

        assert stop_processes([parent.pid], grace=5.0) == []
        parent.wait(timeout=10)
        assert not psutil.pid_exists(children[0].pid) or (
            psutil.Process(children[0].pid).status() == psutil.STATUS_ZOMBIE
        )
    finally:
        parent.kill()
        parent.wait()


def test_only_the_superlink_of_this_flwr_home_and_port_is_found(tmp_path: Path) -> None:
    database = str(tmp_path / "local-superlink" / "state.db")

    def superlink(pid: int, *args: str) -> Process:
        command = ("/venv/bin/python", "/venv/bin/flower-superlink", *args)
        return Process(pid, 1, pid, False, 0.0, command)

    table = {
        10: superlink(10, "--database", database, "--port", "9093"),
        11: superlink(11, "--database", database, "--port", "9100"),
        12: superlink(12, "--database", "/elsewhere/state.db", "--port", "9093"),
        13: Process(13, 1, 13, False, 0.0, ("sleep", database)),
    }
    assert sorted(find_local_superlinks(table, tmp_path)) == [10, 11]
    assert find_local_superlinks(table, tmp_path, port=9093) == [10]
