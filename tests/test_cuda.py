"""GPU checks: the whole app and its heavy server phases on CUDA.

Skipped where no GPU is (CI, the 2-core VM); run them on a GPU machine with
``python -m pytest -q tests/test_cuda.py``. They protect what the CPU suite cannot see: a tensor
left on the wrong device, a checkpoint or an upload that would only load where a GPU is, and
CUDA-only numerics (tests/test_distill.py and tests/test_meta.py run their training checks on
CUDA too).
"""

from __future__ import annotations

import pytest
import torch

from common.train import resolve_device
from tests.fakedata import write_fake_fashion_mnist
from tests.runs import final_model, read_json, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_device_is_cuda() -> None:
    assert resolve_device("auto").type == "cuda"


@pytest.mark.parametrize("strategy", ["mosaic", "mosaic-no-meta", "feddf", "dense", "fedavg"])
def test_tiny_run_on_cuda_completes_and_writes_cpu_tensors(tmp_path, strategy) -> None:
    """Clients and server on the GPU; what is saved must still load on a CPU-only machine."""
    data = write_fake_fashion_mnist(tmp_path / "data")
    grid, folder = run(data, tmp_path / "results", device="cuda", strategy=strategy)

    rounds = read_json(folder, "metrics.json")["rounds"]
    assert sorted(rounds) == ["0", "1", "2", "3"]  # round 0: the initial model
    assert all(0.0 <= values["accuracy"] <= 1.0 for values in rounds.values())
    if strategy != "fedavg":
        assert "teacher-accuracy" in rounds["2"]
    assert all(not reply.has_error() for reply in grid.sent)
    state = final_model(folder)
    assert all(tensor.device.type == "cpu" for tensor in state.values())
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_cuda_run_matches_cpu_run_in_accuracy(tmp_path) -> None:
    """Same seed and data: GPU kernels differ in rounding only, so accuracies stay close."""
    data = write_fake_fashion_mnist(tmp_path / "data")
    accuracies = {}
    for device in ("cpu", "cuda"):
        _, folder = run(data, tmp_path / device, device=device, num_rounds=2, kd_round=2)
        rounds = read_json(folder, "metrics.json")["rounds"]
        accuracies[device] = [rounds[r]["accuracy"] for r in sorted(rounds)]
    assert accuracies["cuda"] == pytest.approx(accuracies["cpu"], abs=0.1)
