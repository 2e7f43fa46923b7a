"""The results folder: written by RunReport, read back by RunResults, never outside its root."""

from pathlib import Path

import pytest

from common.config import parse_run_config, pyproject_defaults
from server_app.results import RunReport, RunResults


def _cfg(**overrides):
    return parse_run_config({**pyproject_defaults(), "run-name": "r", **overrides})


def test_a_run_name_that_leaves_the_results_root_is_refused(tmp_path: Path) -> None:
    escaping = _cfg().model_copy(update={"run_name": ".."})  # past the schema, on purpose
    with pytest.raises(ValueError, match="run-name"):
        RunReport(tmp_path / "results", escaping, {})
    assert not (tmp_path / "config.json").exists()


def test_what_the_report_writes_reads_back(tmp_path: Path) -> None:
    report = RunReport(tmp_path, _cfg(), {"run-name": "r"})
    report.record_round(0, accuracy=0.1, loss=2.3)
    report.record_round(1, accuracy=0.5, loss=1.2, **{"teacher-accuracy": 0.7})
    report.add_phase_seconds("total", 12.0)

    results = RunResults.read(tmp_path / "r")

    assert results.last_round == 1 and results.rounds[1]["accuracy"] == 0.5
    assert list(results.teacher_rounds()) == [1]
    lines = results.summary_lines()
    assert lines[0] == "final test accuracy: 0.5000 (round 1)"
    assert "teacher-accuracy: 0.7000 (round 1)" in lines
    assert "wall time, total: 12.0 s" in lines
    assert RunResults.read(tmp_path / "missing").summary_lines()[0].startswith("no metrics")


def test_the_summary_says_when_the_accuracy_is_on_a_test_subset(tmp_path: Path) -> None:
    report = RunReport(tmp_path, _cfg(), {"run-name": "r", "test-samples": 1000})
    report.record_round(1, accuracy=0.5, loss=1.2)
    lines = RunResults.read(tmp_path / "r").summary_lines()
    assert lines[0] == "final test accuracy (1000 test samples): 0.5000 (round 1)"
