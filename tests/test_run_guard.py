"""How the launchers end a run (deploy/flwr_cli.py ``guarded_run``, ``report_run_end``).

Both ``deploy.simulation`` and ``deploy.local`` go through these, so the exit codes and the
always-run cleanup are checked once here, in-process, without starting Flower.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from deploy.flwr_cli import COMPLETED, guarded_run, report_run_end


class Cleanup:
    def __init__(self) -> None:
        self.calls = 0
        self.sigterm_during = None

    def __call__(self) -> None:
        self.calls += 1
        self.sigterm_during = signal.getsignal(signal.SIGTERM)


def test_a_clean_body_has_no_exit_code_and_is_cleaned_up() -> None:
    cleanup = Cleanup()
    handler = signal.getsignal(signal.SIGTERM)
    with guarded_run("simulation", 10.0, cleanup) as early:
        pass
    assert early.code is None
    assert cleanup.calls == 1
    assert cleanup.sigterm_during == signal.SIG_IGN  # a second Ctrl-C cannot cut it short
    assert signal.getsignal(signal.SIGTERM) == handler  # handlers restored


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (subprocess.TimeoutExpired(["flwr"], 5), 124, "longer than --timeout 7"),
        (subprocess.CalledProcessError(3, ["flwr"]), 1, "flwr run exited with 3"),
    ],
)
def test_a_failed_run_becomes_an_exit_code_and_is_cleaned_up(error, code, message, capsys):
    cleanup = Cleanup()
    with guarded_run("simulation", 7.0, cleanup) as early:
        raise error
    assert early.code == code
    assert cleanup.calls == 1
    assert message in capsys.readouterr().err


def test_sigterm_stops_the_body_and_exits_128_plus_the_signal(capsys) -> None:
    cleanup = Cleanup()
    with guarded_run("federation", None, cleanup) as early:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        pytest.fail("SIGTERM did not interrupt the body")
    assert early.code == 128 + signal.SIGTERM
    assert cleanup.calls == 1
    assert "Interrupted (SIGTERM): stopping the federation" in capsys.readouterr().err


def test_other_errors_propagate_after_cleanup() -> None:
    cleanup = Cleanup()
    with pytest.raises(KeyError), guarded_run("simulation", None, cleanup):
        raise KeyError("bug")
    assert cleanup.calls == 1


def test_the_end_of_a_run_is_reported_with_its_exit_code(capsys) -> None:
    assert report_run_end(4, COMPLETED, "", Path("log"), 12.3, " (start-up included)") == 0
    assert "Run 4 finished:completed in 12 s (start-up included)" in capsys.readouterr().out
    assert report_run_end(5, "finished:failed", "boom", Path("superlink.log"), 1.0) == 1
    err = capsys.readouterr().err
    assert "run 5 ended as 'finished:failed' (boom)" in err and "superlink.log" in err
