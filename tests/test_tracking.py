"""Optional tracking: a run's rounds as TensorBoard scalars, and a clear error without the
package."""

import importlib.util

import pytest

from common.config import ConfigError
from server_app.tracking import TENSORBOARD_FOLDER, check_tracking
from tests.fakedata import write_fake_fashion_mnist
from tests.runs import read_json, run


@pytest.mark.integration
def test_a_tracked_run_writes_every_rounds_scalars_as_tensorboard_events(tmp_path) -> None:
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    data_root = write_fake_fashion_mnist(tmp_path / "data")
    _, folder = run(
        data_root, tmp_path / "results", strategy="fedavg", num_rounds=2, tracking="tensorboard"
    )

    events = event_accumulator.EventAccumulator(str(folder / TENSORBOARD_FOLDER))
    events.Reload()
    accuracy = {event.step: event.value for event in events.Scalars("accuracy")}
    rounds = read_json(folder, "metrics.json")["rounds"]
    assert accuracy == pytest.approx({int(r): v["accuracy"] for r, v in rounds.items()})
    assert {"loss", "seconds", "replied"} <= set(events.Tags()["scalars"])


def test_tracking_without_its_package_fails_naming_the_key(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real(name, *a),
    )
    with pytest.raises(ConfigError, match=r"tracking: .*pip install"):
        check_tracking("tensorboard")
    check_tracking("none")  # the default needs nothing
