"""Run the whole app in one process: a Grid that hands messages straight to the ClientApp.

Flower's simulation engine (Ray) and real deployment are how the app is meant to run; this
Grid is for what needs the full server loop without either: unit and fault-injection tests,
quick experiments and benchmarks on a 2-core machine where Ray's start-up dominates a small run.
Each node keeps its own ``Context`` (node config and state) across rounds, as a SuperNode does,
a ClientApp exception comes back as an error reply, as it would over the network, and a reply
that took a node longer than the round timeout is dropped, as Flower's Grid stops waiting for
it. Nodes run one after another, so the timeout applies to each node's own time, as if they ran
in parallel.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from logging import WARNING
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 0
RUN_ID = 1


class InProcessGrid(Grid):
    """A Grid of ``num_nodes`` in-process nodes; node i holds partition i of ``num_nodes``,
    unless ``node_configs`` gives node i its whole node config (e.g. only a ``data-dir``).

    ``tamper`` (node id, reply) -> reply lets tests alter what a node sends, and
    ``reply_order`` (replies) -> replies the order they arrive in (over a network, any order).
    """

    def __init__(
        self,
        client_app: ClientApp | Callable[[Message, Context], Message],
        num_nodes: int,
        run_config: Mapping[str, Any],
        *,
        node_configs: Mapping[int, Mapping[str, Any]] | None = None,
        tamper: Callable[[int, Message], Message] | None = None,
        reply_order: Callable[[list[Message]], list[Message]] | None = None,
    ) -> None:
        self.client_app = client_app
        self.tamper = tamper
        self.reply_order = reply_order
        self.contexts = {
            node_id: Context(
                run_id=RUN_ID,
                node_id=node_id,
                node_config=dict(
                    (node_configs or {}).get(node_id)
                    or {"partition-id": node_id - 1, "num-partitions": num_nodes}
                ),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for node_id in range(1, num_nodes + 1)
        }
        self.sent: list[Message] = []  # every reply that "left" a node, for audits
        self._run = Run.create_empty(RUN_ID)
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = RUN_ID
        TaskIdentity.node_id = SERVER_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid delivers synchronously: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid delivers synchronously: use send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do on push
            node_id = msg.metadata.dst_node_id
            started = time.monotonic()
            try:
                reply = self.client_app(msg, self.contexts[node_id])
            except Exception as error:  # a node's crash becomes its error reply
                reply = Message(
                    Error(
                        ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(error).__name__}: {error}"
                    ),
                    reply_to=msg,
                )
            if self.tamper is not None:
                reply = self.tamper(node_id, reply)
            if reply is None:
                continue
            self.sent.append(reply)
            if timeout is not None and time.monotonic() - started > timeout:
                log(WARNING, "node %d answered after the %.1f s timeout: dropped", node_id, timeout)
                continue
            replies.append(reply)
        return replies if self.reply_order is None else self.reply_order(replies)


def run_inprocess(
    run_config: Mapping[str, Any],
    num_nodes: int,
    *,
    tamper: Callable[[int, Message], Message] | None = None,
    client_app: Callable[[Message, Context], Message] | None = None,
    reply_order: Callable[[list[Message]], list[Message]] | None = None,
    node_configs: Mapping[int, Mapping[str, Any]] | None = None,
) -> InProcessGrid:
    """Run the ServerApp's main loop against ``num_nodes`` in-process ClientApps (the
    project's own, or ``client_app``: e.g. the benchmarks' reply cache wrapped around it)."""
    from server_app.app import main

    if client_app is None:
        from client_app.app import app as client_app

    grid = InProcessGrid(
        client_app,
        num_nodes,
        run_config,
        node_configs=node_configs,
        tamper=tamper,
        reply_order=reply_order,
    )
    context = Context(
        run_id=RUN_ID,
        node_id=SERVER_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config),
    )
    main(grid, context)
    return grid
