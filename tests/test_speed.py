"""The speed benchmark's measuring parts: the stacked teacher it compares against the loop, the
client-call timers, and the KD probe."""

from __future__ import annotations

import pytest
import torch

import client_app.app as client
from benchmarks.speed import (
    CLIENT_CALLS,
    StackedSmallCNN,
    client_models,
    kd_parts,
    main,
    profile_rows,
    timed_client_calls,
)
from server_app.moe import ExpertEnsemble


def test_the_stacked_network_computes_what_the_loop_of_models_does() -> None:
    models = client_models(3, seed=1)
    loop = ExpertEnsemble(models[0], {k: m.state_dict() for k, m in enumerate(models)})
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(StackedSmallCNN(models)(x), loop(x), rtol=1e-4, atol=1e-4)


def test_client_calls_are_timed_and_the_clientapp_is_left_as_found() -> None:
    original = client.compute_prototypes
    with timed_client_calls() as seconds:
        assert client.compute_prototypes is not original
        with pytest.raises((TypeError, AttributeError)):
            client.compute_prototypes(None)  # fails inside; the time still counts
    assert client.compute_prototypes is original
    assert set(seconds) == set(CLIENT_CALLS.values())
    assert seconds["client: prototypes"] > 0 and seconds["client: local training"] == 0


def test_the_profile_accounts_for_the_whole_run() -> None:
    run = {
        "total": 100.0,
        "client": {"client: local training": 30.0, "client: generator training": 0.0},
        "server": {"meta-seconds": 5.0, "kd-seconds": 20.0, "kd-teacher-seconds": 15.0},
    }
    rows = dict(profile_rows(run))
    assert "client: generator training" not in rows  # nothing to show
    assert rows["server: distillation, student steps"] == 5.0
    assert sum(rows.values()) == 100.0


@pytest.mark.parametrize("meta_features", ["experts", "global"])
def test_the_kd_probe_times_labelling_and_student_steps(meta_features: str) -> None:
    parts = kd_parts(clients=2, steps=1, batch_per_generator=2, meta_features=meta_features)
    assert set(parts) == {"all: labelling", "all: student", "ten: labelling", "ten: student"}
    assert all(seconds > 0 for seconds in parts.values())


def test_the_tiers_part_times_one_client_of_every_width(capsys) -> None:
    main(["--part", "tiers", "--profile", "conf/quick.toml", "--tier-gen-steps", "2"])
    lines = capsys.readouterr().out.splitlines()
    widths = [
        line.split("|")[1].strip() for line in lines if line.startswith("| ") and "---" not in line
    ]
    assert widths == ["width", "1", "0.5", "0.25"]  # the header, then the tiers widest first
