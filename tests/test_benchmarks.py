"""The benchmark harness (benchmarks/: suites, runs, records, the table) on tiny fake data."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks import (
    ALL_STRATEGIES,
    DOCS_RESULTS,
    REPO,
    SUITES,
    UNREAD_KEYS,
    Cell,
    Suite,
    refresh_quoted_table,
    render_table,
    run_cell,
    run_suite,
)
from benchmarks.report import GENERATED_END, generated_marker, refresh_generated_block
from common.config import pyproject_defaults
from server_app.inprocess import run_inprocess
from tests.fakedata import OTHER_VALUES, TINY_SIZES, tiny_run_config, write_fake_fashion_mnist

pytestmark = pytest.mark.integration  # whole runs of the app in this process

CELLS = [
    Cell("fashion-mnist", 1.0, 3, "one-shot", "fedavg", 0),
    Cell("fashion-mnist", 1.0, 3, "one-shot", "label-share", 0),
]
# The protocol sets num-rounds, kd-round and local steps; keep the tiny sizes for the rest.
SIZES = {**TINY_SIZES, "local-steps": 3, "local-epochs": 0.0, "min-partition-size": 5}
for key in ("num-rounds", "kd-round", "proto-start-round", "run-name"):
    SIZES.pop(key)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def base(data_root, tmp_path_factory) -> dict:
    return tiny_run_config(data_root, tmp_path_factory.mktemp("unused"))


class CountingRunner:
    """``run_inprocess`` that counts its calls and raises for one strategy."""

    def __init__(self, crash_strategy: str = "") -> None:
        self.calls: list[str] = []
        self.crash_strategy = crash_strategy

    def __call__(self, config, num_nodes):
        self.calls.append(config["run-name"])
        if config["strategy"] == self.crash_strategy:
            raise RuntimeError("boom")
        return run_inprocess(config, num_nodes)


@pytest.fixture(scope="module")
def suite_run(base, tmp_path_factory) -> tuple[Path, list[dict], CountingRunner]:
    out = tmp_path_factory.mktemp("bench")
    runner = CountingRunner()
    records = run_suite(
        Suite("test", CELLS, SIZES), out, base=base, runner=runner, progress=lambda _: None
    )
    return out, records, runner


def test_suite_writes_one_record_per_cell(suite_run) -> None:
    out, records, runner = suite_run
    assert len(runner.calls) == 2
    assert [r["status"] for r in records] == ["ok", "ok"]
    for cell in CELLS:
        record = json.loads((out / "cells" / f"{cell.key}.json").read_text())
        assert record["config"]["strategy"] == cell.strategy
        assert record["config"]["num-rounds"] == 1
        assert 0.0 <= record["final_accuracy"] <= 1.0
        assert record["phase_seconds"]["total"] >= 0
        assert record["bytes_per_client"]["uplink"] > 0
        assert record["peak_rss_mb"] > 0
        assert record["hardware"]["cpus"] >= 1
        assert record["hardware"]["torch_threads"] >= 1
        assert (record["peak_gpu_mb"] is None) == (record["hardware"]["gpu"] is None)
    label_share = json.loads((out / "cells" / f"{CELLS[1].key}.json").read_text())
    assert label_share["teacher_accuracy"] is not None


def test_a_record_holds_every_distillation_of_a_kd_every_run(base, tmp_path) -> None:
    cell = Cell("fashion-mnist", 1.0, 2, "multi-round", "mosaic-no-meta", 0)
    config = {
        **base,
        "strategy": cell.strategy,
        "num-rounds": 3,
        "kd-round": 1,
        "kd-every": 1,
        "results-dir": str(tmp_path),
        "run-name": cell.key,
    }
    record = run_cell(cell, config, tmp_path, run_inprocess)
    assert record["status"] == "ok", record.get("traceback")
    assert sorted(record["distillations"]) == [1, 2, 3]
    for figures in record["distillations"].values():
        assert all(0.0 <= figures[k] <= 1.0 for k in ("teacher", "pre_kd", "post_kd"))
    # The top-level figures stay the kd-round's; the round's own result is post-KD.
    assert record["teacher_accuracy"] == record["distillations"][1]["teacher"]
    assert record["accuracy_per_round"][3] == record["distillations"][3]["post_kd"]


def test_a_distillation_keeps_the_prior_it_was_scored_against() -> None:
    from benchmarks import distillations

    rounds = {
        1: {"accuracy": 0.5},
        2: {"teacher-accuracy": 0.8, "prior-accuracy": 0.85, "post-kd-accuracy": 0.7},
        3: {"teacher-accuracy": 0.9},
    }
    assert distillations(rounds) == {
        2: {"teacher": 0.8, "pre_kd": None, "post_kd": 0.7, "prior": 0.85},
        3: {"teacher": 0.9, "pre_kd": None, "post_kd": None},
    }


def test_recorded_cells_are_reused_unless_forced(suite_run, base) -> None:
    out, first, _ = suite_run
    runner = CountingRunner()
    again = run_suite(
        Suite("test", CELLS, SIZES), out, base=base, runner=runner, progress=lambda _: None
    )
    assert runner.calls == []
    assert again == first
    forced = CountingRunner()
    run_suite(
        Suite("test", CELLS[:1], SIZES),
        out,
        base=base,
        runner=forced,
        force=True,
        progress=lambda _: None,
    )
    assert forced.calls == [CELLS[0].key]


def test_a_selection_tables_every_recorded_cell_of_its_suite(suite_run, base) -> None:
    out, _, _ = suite_run
    runner = CountingRunner()
    records = run_suite(
        Suite("test", CELLS[:1], SIZES),
        out,
        base=base,
        runner=runner,
        progress=lambda _: None,
        table_cells=CELLS,
    )
    assert runner.calls == [] and [r["key"] for r in records] == [CELLS[0].key]
    table = (out / "results.md").read_text()
    assert "| fedavg | 1 |" in table and "| label-share | 1 |" in table


def test_a_record_made_under_another_config_is_run_again(suite_run, base) -> None:
    out, _, _ = suite_run
    messages: list[str] = []
    runner = CountingRunner()
    changed = {**base, "momentum": 0.5}  # e.g. a default changed since
    run_suite(
        Suite("test", CELLS[:1], SIZES),
        out,
        base=changed,
        runner=runner,
        progress=messages.append,
        table_cells=CELLS,
    )
    assert runner.calls == [CELLS[0].key]
    # the other cell's record was made under the old config: it stays out of the table
    assert "| label-share |" not in (out / "results.md").read_text()
    assert any("stale (momentum)" in line for line in messages)


def test_a_record_older_than_a_key_is_current_at_the_keys_old_behaviour() -> None:
    from benchmarks import ADDED_KEYS, _changed_keys

    old = {"strategy": "mosaic", "kd-steps": 300}  # made before kd-every and kd-proximal-mu
    assert set(ADDED_KEYS) <= set(pyproject_defaults())  # each still a run-config key
    assert ADDED_KEYS["kd-every"] == 0 and ADDED_KEYS["aggregation"] == "mean"
    now = {**old, **ADDED_KEYS}
    assert _changed_keys(old, now) == []
    assert _changed_keys(old, {**now, "kd-every": 1}) == ["kd-every"]
    assert _changed_keys(old, {**now, "kd-proximal-mu": 10.0}) == ["kd-proximal-mu"]
    assert _changed_keys(old, {**now, "meta-features": "global"}) == ["meta-features"]
    assert _changed_keys(old, {**now, "new-key": 1}) == ["new-key"]


def test_every_key_a_committed_record_lacks_has_its_old_value_in_added_keys() -> None:
    """A key added to the run config without an entry in ADDED_KEYS makes every record made
    before it stale, and the next suite run would redo days of cells for nothing."""
    from benchmarks import ADDED_KEYS, PLACE_KEYS

    keys = set(pyproject_defaults())
    records = sorted((REPO / "benchmarks" / "results").glob("*/cells/*.json"))
    assert records, "the committed benchmark records are missing"
    for path in records:
        lacking = keys - set(json.loads(path.read_text())["config"])
        assert lacking <= set(ADDED_KEYS) | PLACE_KEYS, (path.name, lacking - set(ADDED_KEYS))


def test_a_record_made_in_another_clone_is_current() -> None:
    from benchmarks import _changed_keys

    here = {"strategy": "fedavg", "data-root": "/a/data", "results-dir": "/a/benchmarks/runs"}
    there = {**here, "data-root": "/b/data", "results-dir": "/b/benchmarks/runs"}
    assert _changed_keys(there, here) == []
    assert _changed_keys({**there, "lr": 0.1}, {**here, "lr": 0.01}) == ["lr"]


def test_a_key_the_strategy_does_not_read_leaves_its_record_current(base, tmp_path) -> None:
    runner = CountingRunner()
    suite = Suite("test", CELLS[:1], SIZES)
    run_suite(suite, tmp_path, base=base, runner=runner, progress=lambda _: None)
    changed = {**base, "kd-lr": base["kd-lr"] * 2, "meta-epochs": 9}  # FedAvg reads neither
    records = run_suite(suite, tmp_path, base=changed, runner=runner, progress=lambda _: None)
    assert runner.calls == [CELLS[0].key] and records[0]["status"] == "ok"


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_a_strategy_ignores_the_keys_it_is_declared_not_to_read(
    strategy, data_root, tmp_path
) -> None:
    base = tiny_run_config(data_root, tmp_path, strategy=strategy)
    other = {**base, **{key: OTHER_VALUES[key] for key in UNREAD_KEYS[strategy]}}
    assert other != base
    results = []
    for name, config in (("base", base), ("other", other)):
        run_inprocess({**config, "run-name": name}, 3)
        rounds = json.loads((tmp_path / name / "metrics.json").read_text())["rounds"]
        results.append(
            {
                r: {k: v for k, v in values.items() if "accuracy" in k or "loss" in k}
                for r, values in rounds.items()
            }
        )
    assert results[0] == results[1]
    assert len(results[0]) == base["num-rounds"] + 1 and "accuracy" in results[0]["3"]


def test_a_crashing_cell_is_recorded_and_reported(base, tmp_path) -> None:
    runner = CountingRunner(crash_strategy="label-share")
    records = run_suite(
        Suite("test", CELLS, SIZES), tmp_path, base=base, runner=runner, progress=lambda _: None
    )
    crashed = records[1]
    assert crashed["status"] == "crashed"
    assert "RuntimeError: boom" in crashed["error"]
    saved = json.loads((tmp_path / "cells" / f"{CELLS[1].key}.json").read_text())
    assert saved["status"] == "crashed"
    assert "RuntimeError: boom" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert (tmp_path / "accuracy_per_round.png").stat().st_size > 0


def test_table_has_mean_and_std_over_seeds() -> None:
    def record(strategy: str, seed: int, accuracy: float) -> dict:
        return {
            "cell": vars(Cell("mnist", 0.1, 5, "one-shot", strategy, seed)),
            "status": "ok",
            "final_accuracy": accuracy,
            "teacher_accuracy": accuracy + 0.1,
            "wall_seconds": 1.0,
            "bytes_per_client": {"uplink": 2**20},
            "label_counts": {"client-0": [1, 2 + seed]},  # one split per seed
        }

    table = render_table(
        [record("fedavg", 0, 0.5), record("fedavg", 1, 0.7), record("label-share", 0, 0.5)]
    )
    assert "## one-shot mnist alpha=0.1 clients=5" in table
    assert "| fedavg | 2 | 60.00 ± 14.14 |" in table
    assert "| label-share | 1 | 60.00 |" in table  # judged by its teacher
    assert "seed 0:\n\n- client-0: [1, 2]" in table and "seed 1:\n\n- client-0: [1, 3]" in table
    # Published beside ours, per alpha: the MNIST rows of DENSE's Table 1, ours as the mean.
    assert "## Published numbers beside ours (one-shot, 5 clients)" in table
    assert (
        "| FedAvg (one-shot) | 48.24 (published) | 60.00 (2 seeds) | 72.94 (published) |" in table
    )
    assert "| label-share ensemble (teacher) | - | 60.00 (1 seed) | - | not run |" in table
    assert "FashionMNIST:" not in table  # no FashionMNIST record, no FashionMNIST table


def test_table_counts_reused_replies_of_the_records_that_counted_them() -> None:
    def record(seed: int, replies: dict | None) -> dict:
        made = {
            "cell": vars(Cell("mnist", 0.1, 5, "one-shot", "mosaic", seed)),
            "status": "ok",
            "final_accuracy": 0.9,
            "wall_seconds": 1.0,
            "bytes_per_client": {},
        }
        return made | ({"client_replies": replies} if replies else {})

    both = [record(0, {"reused": 5, "computed": 0}), record(1, {"reused": 2, "computed": 3})]
    assert "| 1 | 7/10 | - | 0 |" in render_table(both)
    older = [record(0, {"reused": 5, "computed": 0}), record(1, None)]
    assert "| 1 | 5/5 (1 of 2 seeds) | - | 0 |" in render_table(older)
    assert "| 1 | - | - | 0 |" in render_table([record(0, None)])


def test_a_glob_selects_part_of_a_suite_with_its_sizes() -> None:
    from benchmarks import SUITES, select_cells

    full = SUITES["full"]
    part = select_cells(full, "one-shot-*-a0.1-*-s0")

    assert part.cells and part.sizes == full.sizes
    assert {c.protocol for c in part.cells} == {"one-shot"}
    assert {c.alpha for c in part.cells} == {0.1} and {c.seed for c in part.cells} == {0}
    assert {c.dataset for c in part.cells} == {"fashion-mnist", "mnist"}
    assert len(part.cells) == 2 * len({c.strategy for c in full.cells})
    assert select_cells(full, "no-such-cell").cells == []


@pytest.mark.parametrize("name", sorted(SUITES))
def test_every_cell_of_a_suite_is_a_valid_run_config(name, tmp_path) -> None:
    """A cell the config rejects cannot run at all; it would only show as "not run"."""
    from benchmarks import suite_base
    from benchmarks.suites import cell_run_config
    from server_app.strategies import validate_run_config

    suite, base = SUITES[name], suite_base(tmp_path)
    for cell in suite.cells:
        validate_run_config(cell_run_config(cell, base, suite.sizes, tmp_path))


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="per-cell peak needs Linux /proc"
)
def test_peak_memory_is_each_cells_own(base, tmp_path) -> None:
    def hungry_first(config, num_nodes):
        if config["strategy"] != "fedavg":
            return run_inprocess(config, num_nodes)
        # 600 MiB resident for the whole first run: its peak is at least the run's own plus
        # that, whatever the worker's memory was before (a run leaves imports and caches
        # resident, so a ballast freed before it could be outgrown by the run alone).
        ballast = bytearray(600 * 2**20)
        ballast[::4096] = b"x" * len(ballast[::4096])
        try:
            return run_inprocess(config, num_nodes)
        finally:
            del ballast

    first, second = run_suite(
        Suite("test", CELLS, SIZES),
        tmp_path,
        base=base,
        runner=hungry_first,
        progress=lambda _: None,
    )
    assert first["peak_rss_mb"] > second["peak_rss_mb"] + 300


@pytest.mark.parametrize(
    ("override", "named"),
    [("kd-stepz=3", "kd-stepz"), ("kd-steps=-1", "kd-steps"), ("kd-steps", "key=value")],
)
def test_a_bad_override_stops_the_suite_before_any_cell_naming_it(
    override, named, tmp_path, capsys
) -> None:
    from benchmarks import main

    with pytest.raises(SystemExit) as stopped:
        main(["--suite", "quick", "--out", str(tmp_path), "--set", override])
    assert stopped.value.code == 2
    assert named in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


def test_a_device_other_than_the_cpu_is_a_variant_of_the_suite(tmp_path) -> None:
    from benchmarks import suite_base, variant_overrides

    assert suite_base(tmp_path)["device"] == "cpu"  # not the pyproject's "auto"

    assert variant_overrides("cpu", ["kd-steps=1500"]) == {"kd-steps": 1500}
    if torch.cuda.is_available():
        assert variant_overrides("auto", []) == {"device": "cuda"}
        assert variant_overrides("cpu", ["device='cuda'"]) == {"device": "cuda"}
    else:
        assert variant_overrides("auto", []) == {}  # auto is the CPU here: the suite itself


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_asking_for_cuda_without_it_stops_before_any_cell(tmp_path, capsys) -> None:
    from benchmarks import main

    with pytest.raises(SystemExit) as stopped:
        main(["--suite", "quick", "--out", str(tmp_path), "--device", "cuda"])
    assert stopped.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_quoted_table_is_replaced_between_its_markers_headings_one_level_down(
    tmp_path,
) -> None:
    table = tmp_path / "results.md"
    table.write_text("# Benchmark results (full suite)\n\nIntro.\n\n## Targets\n\n| a |\n")
    doc = tmp_path / "doc.md"
    before, after = "# Doc\n\n## Current\n\n", "\n## History\n\nkept\n"
    doc.write_text(f"{before}{generated_marker('t.md')}\nstale\n{GENERATED_END}{after}")

    assert refresh_generated_block(doc, table, "t.md")
    quoted = "Intro.\n\n### Targets\n\n| a |\n"
    assert doc.read_text() == f"{before}{generated_marker('t.md')}\n{quoted}{GENERATED_END}{after}"
    assert not refresh_generated_block(doc, table, "t.md")  # already current: left as it is
    assert not refresh_generated_block(doc, table, "other.md")  # quotes no such table


def test_a_marker_without_its_end_is_an_error_not_an_overwrite(tmp_path) -> None:
    table, doc = tmp_path / "results.md", tmp_path / "doc.md"
    table.write_text("# T\n\nnew\n")
    doc.write_text(f"{generated_marker('t.md')}\nold\n## History\n")
    with pytest.raises(ValueError, match="end generated"):
        refresh_generated_block(doc, table, "t.md")
    assert doc.read_text() == f"{generated_marker('t.md')}\nold\n## History\n"


def test_a_table_written_outside_the_repository_never_touches_the_docs(tmp_path) -> None:
    table = tmp_path / "benchmarks" / "results" / "full" / "results.md"
    table.parent.mkdir(parents=True)
    table.write_text("# T\n\nfrom a temporary folder\n")
    doc = tmp_path / "doc.md"
    text = f"{generated_marker('benchmarks/results/full/results.md')}\nold\n{GENERATED_END}\n"
    doc.write_text(text)
    assert not refresh_quoted_table(table, doc)
    assert doc.read_text() == text


def test_the_docs_quote_the_committed_full_table_as_the_harness_writes_it(tmp_path) -> None:
    """docs/results.md's copy of the full suite's table is current: the harness refreshes it
    whenever it writes the table, so a difference means one was edited by hand."""
    table = REPO / "benchmarks" / "results" / "full" / "results.md"
    assert generated_marker("benchmarks/results/full/results.md") in DOCS_RESULTS.read_text()
    copy = tmp_path / "results.md"
    copy.write_text(DOCS_RESULTS.read_text())
    assert not refresh_quoted_table(table, copy), "docs/results.md quotes a stale table"


def test_the_one_shot_profile_runs_the_suites_one_shot_protocol() -> None:
    """conf/fmnist-dir0.1-one-shot.toml is how a user (and the attack benchmark) runs the
    suite's one-shot protocol on the default data: its round keys must not drift from it."""
    import tomllib

    from benchmarks.suites import PROTOCOLS

    profile = tomllib.loads((REPO / "conf" / "fmnist-dir0.1-one-shot.toml").read_text())
    assert {key: profile[key] for key in PROTOCOLS["one-shot"]} == PROTOCOLS["one-shot"]
    defaults = pyproject_defaults(REPO / "pyproject.toml")
    assert "meta-features" not in profile and defaults["meta-features"] == "experts"
