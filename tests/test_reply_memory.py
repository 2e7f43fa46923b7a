"""The reply-memory benchmark (benchmarks/reply_memory.py) measures what it says: each crafted
reply reaches the rule it was built to break, and the figures are read around the server's own
handling. The sizes it reports are the benchmark's to print, not asserted here."""

from pathlib import Path

import pytest

from benchmarks.reply_memory import CASES, MIB, render, run_case

pytestmark = [
    pytest.mark.integration,  # a forked process per case
    pytest.mark.skipif(
        not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs"
    ),
]

VERDICTS = {
    "honest": "accepted",
    "nan-in-last-weight": "weights-finite",
    "extra-weight": "weights-keys",
    "oversized-weight": "weights-shape",
    "oversized-prototype-bank": "prototypes-per-class",
    "long-label-counts": "label-counts",
    "list-as-num-examples": "num-examples",
    "string-as-partition-id": "partition-id",
    "extra-client-key": "client-keys",
    "bytes-as-width": "width",
}


def test_every_case_is_judged_by_the_rule_it_was_built_to_break(tmp_path: Path) -> None:
    assert set(VERDICTS) == set(CASES)
    rows = [run_case(name, MIB, tmp_path) for name in CASES]

    assert {row["case"]: row["verdict"] for row in rows} == VERDICTS
    for row in rows:
        assert row["held"] > 0 and row["extra"] >= 0
        assert row["ratio"] == (row["held"] + row["extra"]) / row["held"]
    attacks = [row for row in rows if row["case"] not in {"honest", "nan-in-last-weight"}]
    assert all(row["wire"] > MIB for row in attacks)  # each carries what it was given
    table = render(rows)
    assert table.count("\n") == len(rows) + 1 and "weights-keys" in table
