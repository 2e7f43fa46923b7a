"""Client replies kept on disk, so benchmark cells that ask the clients the same thing share them.

In a one-shot setting, several methods of one seed send the clients the same message: the same
initial weights and round config (FedDF, Mosaic and its ablation all ask for local training
plus a generator; FedAvg, the ensemble, label-share and DENSE for local training alone; in
multi-round runs the undistilled baselines send FedAvg's messages in every round). That client
work is most of a cell's time, and it is the same work in each. A reply is keyed on everything
that decides it:

- the message: its type and its content, serialised by Flower's own protobuf serde;
- the node's config (its partition) and the client's part of the run config: every key but
  ``SERVER_ONLY_KEYS`` (the round's lr and FedProx's term travel in the message);
- the client's code (every ``.py`` under ``client_app/`` and ``common/``) and the torch and
  flwr versions, so an edit to the client invalidates every reply it made.

Client training is seeded, so a reused reply is the reply the client would send again; a
cell's record counts the replies it reused. Error replies, and replies of a client that
keeps state in its ``Context``, are never kept.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import flwr
import torch
from flwr.app import Context, Message
from flwr.common.serde import ProtoRecordDict, recorddict_from_proto, recorddict_to_proto

from common.config import SERVER_ONLY_KEYS

ClientAppLike = Callable[[Message, Context], Message]
ROOT = Path(__file__).resolve().parents[1]
CLIENT_CODE = ("client_app", "common")


def client_code_digest(root: Path = ROOT) -> str:
    """A hash of the client's source and of the libraries its numbers depend on."""
    digest = hashlib.sha256(f"torch {torch.__version__} flwr {flwr.__version__}".encode())
    for package in CLIENT_CODE:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def reply_key(msg: Message, context: Context, code_digest: str) -> str:
    """The hex digest that names the reply a client gives to ``msg`` in ``context``."""
    client_config = {k: v for k, v in context.run_config.items() if k not in SERVER_ONLY_KEYS}
    digest = hashlib.sha256(code_digest.encode())
    digest.update(msg.metadata.message_type.encode())
    digest.update(json.dumps(client_config, sort_keys=True, default=str).encode())
    digest.update(json.dumps(dict(context.node_config), sort_keys=True, default=str).encode())
    digest.update(recorddict_to_proto(msg.content).SerializeToString(deterministic=True))
    return digest.hexdigest()


class ReplyCache:
    """Replies under ``folder``, one ``<key>.pb`` file each; ``read=False`` recomputes every
    reply (and stores it), as ``--force`` asks."""

    def __init__(self, folder: Path, *, read: bool = True) -> None:
        self.folder = Path(folder)
        self.read = read
        self.code_digest = client_code_digest()
        self.reused = 0
        self.computed = 0

    def wrap(self, client_app: ClientAppLike) -> ClientAppLike:
        """``client_app`` answering from the cache where it can, filling it where it cannot."""

        def cached_client_app(msg: Message, context: Context) -> Message:
            stateless = len(context.state) == 0
            path = self.folder / f"{reply_key(msg, context, self.code_digest)}.pb"
            if self.read and stateless and path.exists():
                content = recorddict_from_proto(ProtoRecordDict.FromString(path.read_bytes()))
                self.reused += 1
                return Message(content, reply_to=msg)
            reply = client_app(msg, context)
            self.computed += 1
            if stateless and len(context.state) == 0 and not reply.has_error():
                self._store(path, reply)
            return reply

        return cached_client_app

    def _store(self, path: Path, reply: Message) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_bytes(recorddict_to_proto(reply.content).SerializeToString())
        os.replace(partial, path)
