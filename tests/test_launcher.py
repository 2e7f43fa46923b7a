"""The simulation launcher: its run config (profile, strategy, sets, name) and the resources of
Flower's federation config, built and checked up front."""

import pytest
import torch

from common.config import ConfigError
from common.train import resolve_device
from deploy.run_config import FEDERATION_KEYS, build_run_config, federation_config
from deploy.simulation import parse_args

CPU = torch.device("cpu")


def test_the_default_federation_config_is_one_cpu_per_clientapp_and_no_gpu_on_cpu() -> None:
    assert federation_config(10, CPU) == (
        "num-supernodes=10 client-resources-num-cpus=1 client-resources-num-gpus=0"
    )


def test_passed_through_pairs_reach_flower_and_win_over_the_launchers_own() -> None:
    args = parse_args(["--client-cpus", "2", "--federation-config", "init-args-num-cpus=2"])
    config = federation_config(3, CPU, args.client_cpus, args.client_gpus, args.federation_config)
    assert config.split() == [
        "num-supernodes=3",
        "client-resources-num-cpus=2",
        "client-resources-num-gpus=0",
        "init-args-num-cpus=2",
    ]
    overridden = federation_config(3, CPU, extra=["client-resources-num-cpus=2 verbose=true"])
    assert "client-resources-num-cpus=2" in overridden.split() and "verbose=true" in overridden
    assert {"client-resources-num-gpus", "init-args-num-gpus", "backend"} <= FEDERATION_KEYS


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"client_cpus": 10_000}, "--client-cpus"),
        ({"client_cpus": 0}, "--client-cpus"),
        ({"client_gpus_each": -1.0}, "--client-gpus"),
        ({"extra": ["num-cpus=4"]}, "init-args-num-cpus"),  # unknown key: the valid ones listed
        ({"extra": ["num-supernodes=4"]}, "--clients"),
        ({"extra": ["verbose"]}, "KEY=VALUE"),
    ],
)
def test_impossible_resources_are_refused_naming_the_option(kwargs, named) -> None:
    with pytest.raises(ConfigError, match=named):
        federation_config(4, CPU, **kwargs)


def test_gpus_asked_for_where_none_is_visible_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        federation_config(4, CPU, client_gpus_each=0.5)


def test_a_cuda_index_this_process_cannot_see_names_cuda_visible_devices(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES"):
        resolve_device("cuda:1")


def test_the_run_config_is_the_profile_then_strategy_then_sets_then_name(tmp_path) -> None:
    profile = tmp_path / "profile.toml"
    profile.write_text(
        'strategy = "feddf"\nalpha = 0.3\nnum-rounds = 4\nkd-round = 3\nrun-name = "p"\n'
    )
    overrides, cfg = build_run_config(profile, "fedavg", ["num-rounds=2"], "named")
    assert (cfg.strategy, cfg.alpha, cfg.num_rounds, cfg.run_name) == ("fedavg", 0.3, 2, "named")
    assert overrides["strategy"] == "fedavg" and overrides["num-rounds"] == 2
    _, unnamed = build_run_config(profile, None, [], None)
    assert (unnamed.strategy, unnamed.run_name) == ("feddf", "p")
