"""Helpers for tests that run the whole app in-process and read its results folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

from common.architectures import build_global_model
from common.config import RunConfig
from common.data import dataset_info
from server_app.inprocess import InProcessGrid, run_inprocess
from server_app.strategies import STRATEGIES, CheckedFedAvg
from tests.fakedata import tiny_run_config

NUM_NODES = 3
Tamper = Callable[[int, Message], Message | None]


def run(
    data_root: Path,
    results: Path,
    tamper: Tamper | None = None,
    reply_order: Callable[[list[Message]], list[Message]] | None = None,
    client_app: Callable[[Message, Context], Message] | None = None,
    **overrides: Any,
) -> tuple[InProcessGrid, Path]:
    """A tiny run on ``NUM_NODES`` in-process nodes (the project's ClientApp, or
    ``client_app``); the grid and the results folder."""
    config = tiny_run_config(data_root, results, **overrides)
    grid = run_inprocess(
        config, NUM_NODES, tamper=tamper, reply_order=reply_order, client_app=client_app
    )
    return grid, results / config["run-name"]


def build_strategy(cfg: RunConfig) -> CheckedFedAvg:
    """The strategy ``cfg`` names, built on CPU without a test set (its evaluations are empty)."""
    info = dataset_info(cfg.dataset)
    template = build_global_model(
        cfg.model,
        cfg.architecture_rule,
        num_classes=info.num_classes,
        in_shape=info.image_shape,
    )
    return STRATEGIES[cfg.strategy](cfg, template, info, device=torch.device("cpu"))


def read_json(folder: Path, name: str) -> Any:
    return json.loads((folder / name).read_text())


def final_model(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "final_model.pt", weights_only=True)


def assert_same_state(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key, tensor in first.items():
        assert torch.equal(tensor, second[key]), key


def error_reply(node: int, reason: str = "dropped") -> Tamper:
    """A tamper that replaces ``node``'s reply (after it trained) with an error reply."""

    def tamper(node_id: int, reply: Message) -> Message:
        if node_id == node:
            error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason)
            # Replying twice swaps source and destination back: the error comes from ``node``.
            return Message(error, reply_to=Message(error, reply_to=reply))
        return reply

    return tamper


def no_reply(nodes: set[int]) -> Tamper:
    """A tamper under which ``nodes`` never answer (dropped out, or later than the timeout)."""

    def tamper(node_id: int, reply: Message) -> Message | None:
        return None if node_id in nodes else reply

    return tamper
