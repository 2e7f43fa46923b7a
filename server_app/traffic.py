"""What travels between the ServerApp and each client, in bytes, and whether it can travel.

How Flower 1.42 moves a message (SuperLink <-> SuperNode is protobuf over HTTP(S), not gRPC):
the message is split into objects (its RecordDict, each record, each Array, and each Array's
data in chunks of at most ``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``, 5 MiB), and every object is
pushed or pulled in its own request, each carried as the ``bytes`` field of one protobuf message.
So what counts:

- **per object, hard**: protobuf cannot serialize a message over 2 GiB - 1 bytes, the same number
  as ``flwr.common.GRPC_MAX_MESSAGE_LENGTH`` that Flower sets on its (legacy) gRPC servers.
  Array data is chunked, so only an unchunked record (a ConfigRecord or MetricRecord) could
  reach it; a bigger object makes the sender raise mid-push, and the round then waits for its
  timeout.
- **per message, practical**: no transport limit, but the whole message sits in memory in the
  SuperLink's object store, the ServerApp and the ClientApp, and SQLite-backed SuperLink state
  fails around 2 GB. We budget 1 GiB per message (:data:`MESSAGE_BUDGET_BYTES`).

:func:`check_payload_limits` runs before the first round (the strategy calls it, and so does
``deploy.local`` before starting anything): it sizes the largest messages a config can produce
(the model weights down; weights + generator + prototypes up) from shapes alone, on torch's
``meta`` device, and raises :class:`PayloadTooLargeError` naming the keys to change. Each round,
:func:`log_downlink` and :func:`log_uplink` record the serialized bytes per node and record
name (what :func:`record_bytes` measures is exactly what Flower pushes: the deflated objects),
and a downlink message over the limits stops the run with the same error, never a hang.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import torch
from flwr.app import Message, RecordDict
from flwr.common import GRPC_MAX_MESSAGE_LENGTH
from flwr.common.logger import log
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    no_object_id_recompute,
)

from common.config import ConfigError, RunConfig
from common.data import dataset_info
from common.models import GeneratorSpec, build_classifier, build_generator
from common.wire import Uploads

OBJECT_LIMIT_BYTES = GRPC_MAX_MESSAGE_LENGTH  # 2**31 - 1: protobuf's (and gRPC's) ceiling
MESSAGE_BUDGET_BYTES = 1 << 30  # 1 GiB: see the module docstring
ARRAY_OVERHEAD_BYTES = 512  # npy header + Array/chunk headers per tensor, an upper bound
DOWNLINK, UPLINK, TOTAL = "downlink", "uplink", "total"

# node id -> {"downlink"|"uplink": {record name | "total": bytes}}; one per round (RoundLog).
NodeTraffic = dict[int, dict[str, dict[str, int]]]


class PayloadTooLargeError(ConfigError):
    """A message that could not travel, or would exceed the budget; the text says what to change."""


def _measure(content: RecordDict) -> tuple[dict[str, int], tuple[str, int]]:
    """Bytes per record name and ``"total"``, and the largest object (type, bytes).

    Each distinct object counts once, as Flower pushes it (identical chunks travel once); the
    total adds the RecordDict's own object, a few hundred bytes. Every object is deflated once.
    """
    with no_object_id_recompute():  # object ids are hashes of the deflated bytes: hash once
        objects = get_all_nested_objects(content)
        sizes = {object_id: len(obj.deflate()) for object_id, obj in objects.items()}
        per_record = {
            name: sum(sizes[object_id] for object_id in get_all_nested_objects(record))
            for name, record in content.items()
        }
    per_record[TOTAL] = sum(sizes.values())
    largest = max(sizes, key=sizes.__getitem__)
    return per_record, (type(objects[largest]).__name__, sizes[largest])


def record_bytes(content: RecordDict) -> dict[str, int]:
    """Serialized bytes per record name, and ``"total"`` for the whole RecordDict."""
    return _measure(content)[0]


def check_message(content: RecordDict, what: str) -> dict[str, int]:
    """Sizes of ``content`` (as :func:`record_bytes`); raise if it cannot or should not travel."""
    sizes, (kind, largest) = _measure(content)
    if largest > OBJECT_LIMIT_BYTES:
        raise PayloadTooLargeError(
            f"{what}: one {kind} object is {largest:,} bytes, over the {OBJECT_LIMIT_BYTES:,}-byte "
            "protobuf limit on one object; put large data in an ArrayRecord (chunked) instead"
        )
    if sizes[TOTAL] > MESSAGE_BUDGET_BYTES:
        biggest = max((n for n in sizes if n != TOTAL), key=sizes.__getitem__)
        raise PayloadTooLargeError(
            f"{what}: {sizes[TOTAL]:,} bytes, over the {MESSAGE_BUDGET_BYTES:,}-byte budget per "
            f"message (largest record: {biggest!r}, {sizes[biggest]:,} bytes)"
        )
    return sizes


def log_downlink(traffic: NodeTraffic, messages: Iterable[Message]) -> None:
    """Record what each instruction carries to its node; raise before sending an oversized one.

    FedAvg shares one RecordDict among all nodes of a round, so each is measured once.
    """
    measured: dict[int, dict[str, int]] = {}
    for msg in messages:
        key = id(msg.content)
        if key not in measured:
            measured[key] = check_message(msg.content, f"{msg.metadata.message_type} instruction")
        traffic.setdefault(msg.metadata.dst_node_id, {})[DOWNLINK] = dict(measured[key])


def log_uplink(traffic: NodeTraffic, msg: Message) -> None:
    """Record what a reply carried from its node.

    Error replies carry no records and are left out: one may not even come from the node (the
    SuperLink answers for a node that stopped sending heartbeats, under its own node id). The
    strategy sizes only well-formed replies: sizing serializes every unchunked record, several
    copies of it at once, so a malformed one is refused first (its rule is its record).
    """
    if not msg.has_error():
        traffic.setdefault(msg.metadata.src_node_id, {})[UPLINK] = record_bytes(msg.content)


# --- before the first round -------------------------------------------------------------------


def _state_bytes(module: torch.nn.Module) -> int:
    """Upper bound on the serialized size of a state dict, from shapes alone."""
    return sum(
        t.numel() * t.element_size() + ARRAY_OVERHEAD_BYTES for t in module.state_dict().values()
    )


def payload_estimates(cfg: RunConfig, uploads: Uploads) -> dict[str, int]:
    """Upper bounds in bytes on the largest messages of a run, without allocating a weight.

    ``weights``: the model (down every round, up every round); ``generator``: one client's
    generator (up once, when the strategy's ``uploads`` include it); ``prototypes``: one
    client's prototypes at most (``protos-per-class`` centres for every class, likewise);
    ``downlink``/``uplink``: the largest instruction and reply.
    """
    info = dataset_info(cfg.dataset)
    with torch.device("meta"):
        model = build_classifier(
            cfg.model,
            num_classes=info.num_classes,
            in_shape=info.image_shape,
            width=cfg.model_width,
        )
        weights = _state_bytes(model)
        estimates = {"weights": weights, "downlink": weights, "uplink": weights}
        if uploads.generator:
            spec = GeneratorSpec(cfg.gen_latent_dim, info.image_shape, cfg.gen_channels)
            estimates["generator"] = _state_bytes(build_generator(spec))
        if uploads.prototypes:
            centres = cfg.protos_per_class * info.num_classes
            estimates["prototypes"] = (
                centres * (model.feature_dim * 4 + 8) + 2 * ARRAY_OVERHEAD_BYTES
            )
        estimates["uplink"] = (
            weights + estimates.get("generator", 0) + estimates.get("prototypes", 0)
        )
    return estimates


def check_payload_limits(cfg: RunConfig, uploads: Uploads) -> dict[str, int]:
    """Fail fast, naming the keys to change, when a run's messages would exceed the budget.

    Returns :func:`payload_estimates`.
    """
    estimates = payload_estimates(cfg, uploads)
    keys = {
        "downlink": "model, model-width",
        "uplink": "model, model-width"
        + (", gen-channels, gen-latent-dim" if "generator" in estimates else "")
        + (", protos-per-class" if "prototypes" in estimates else ""),
    }
    for direction, fix in keys.items():
        if estimates[direction] > MESSAGE_BUDGET_BYTES:
            parts = ", ".join(
                f"{name} {estimates[name]:,}"
                for name in ("weights", "generator", "prototypes")
                if name in estimates
            )
            raise PayloadTooLargeError(
                f"{fix}: the largest {direction} message would be about "
                f"{estimates[direction]:,} bytes ({parts}), over the {MESSAGE_BUDGET_BYTES:,}-byte "
                "budget per message (server_app/traffic.py explains it); make them smaller"
            )
    log(
        INFO,
        "Payloads: model weights %.2f MB, largest reply %.2f MB (budget %.0f MB per message)",
        estimates["weights"] / 1e6,
        estimates["uplink"] / 1e6,
        MESSAGE_BUDGET_BYTES / 1e6,
    )
    return estimates
