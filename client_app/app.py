"""The Mosaic ClientApp: decode a message, call plain-PyTorch code in ``common``, encode a reply.

What leaves the client (and nothing else): model weights, its sample count, one label count per
class, k-means prototypes (cluster centres of at least ``min-proto-samples`` samples) when the
server asks for them, its generator's weights once per run, and the width (and, in a federation of
several, the architecture) it trained.

With ``width-tiers`` a client trains a width sub-model of the global model (``common.tiers``
says which; ``common.submodels`` how it is cut). The server sends a node its slice once it
knows the node's width; until then it sends the full model and the client cuts its own slice
with the same rule. With ``architectures`` a client runs its own architecture
(``common.architectures``) and is sent, or cuts out of the server's zoo, that member.
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from common.architectures import ArchitectureSlicer, node_architecture
from common.config import RunConfig, parse_run_config
from common.data import (
    dataset_info,
    generator_to_classifier_input,
    label_counts,
    load_client_partition,
    load_dataset,
    partition_indices,
)
from common.generator import train_generator
from common.models import Classifier, GeneratorSpec, build_classifier
from common.node_data import TEST, TRAIN, content_id, read_split
from common.paths import data_root
from common.submodels import WidthSlicer
from common.tiers import node_width
from common.train import compute_prototypes, evaluate, resolve_device, train_local
from common.wire import (
    ARRAYS,
    RoundInstructions,
    pack_train_reply,
    record_to_state,
    state_signature,
)

app = ClientApp()


def _data_dir(context: Context) -> Path | None:
    """This node's own data folder (``--node-config data-dir=...``), if it has one."""
    value = context.node_config.get("data-dir")
    return Path(str(value)).expanduser() if value else None


def _identity(context: Context) -> tuple[int, int | None]:
    """This node's partition id and the partition count, from its node config (filled by the
    simulation or by --node-config). A node on its own data (``data-dir``) may leave both out:
    its id then comes from its data (:func:`common.node_data.content_id`), with no count."""
    node_config = context.node_config
    if "partition-id" in node_config and ("num-partitions" in node_config or _data_dir(context)):
        count = node_config.get("num-partitions")
        return int(node_config["partition-id"]), None if count is None else int(count)
    if (folder := _data_dir(context)) is not None:
        return content_id(folder), None
    missing = "partition-id" if "partition-id" not in node_config else "num-partitions"
    raise ValueError(
        f"node config lacks '{missing}': start the SuperNode with --node-config "
        "'partition-id=<i> num-partitions=<n>' (a share of the public dataset) or "
        "'data-dir=\"<folder>\"' (its own data, see common/node_data.py)"
    )


def _width(cfg: RunConfig, context: Context) -> float:
    """The capacity rate this node trains at (``width-tiers``, or its node config's ``width``).
    A node on its own data with no partition count has no place in the rule: with width tiers
    it must name its width."""
    partition_id, num_partitions = _identity(context)
    if num_partitions is None:
        if cfg.tiers and "width" not in context.node_config:
            raise ValueError(
                "width-tiers is set and this node (data-dir, no num-partitions) has no place in "
                "its rule: add width=<rate> to its --node-config"
            )
        return node_width(cfg.tiers, context.node_config, 0, 1, cfg.data_seed)
    return node_width(cfg.tiers, context.node_config, partition_id, num_partitions, cfg.data_seed)


def _arch(cfg: RunConfig, context: Context) -> str | None:
    """This node's architecture in a federation of several (``architectures``, or its node
    config's ``arch``); None when every client runs ``model``."""
    if not cfg.architectures:
        return None
    partition_id, num_partitions = _identity(context)
    return node_architecture(
        cfg.architecture_rule, context.node_config, partition_id, num_partitions, cfg.data_seed
    )


def _model_from(
    cfg: RunConfig,
    msg: Message,
    rate: float,
    window_start: int | None = None,
    arch: str | None = None,
) -> Classifier:
    """This node's model at ``rate`` (of architecture ``arch``, by default ``model``), holding
    the weights the server sent: its slice or member as sent, or cut here from the full model
    (windows from ``window_start``, by default the round's) or the zoo of architectures."""
    info = dataset_info(cfg.dataset)
    model = build_classifier(
        arch or cfg.model,
        num_classes=info.num_classes,
        in_shape=info.image_shape,
        width=cfg.model_width * rate,
    )
    state = record_to_state(msg.content[ARRAYS])
    if arch is not None and state_signature(state) != state_signature(model.state_dict()):
        zoo = ArchitectureSlicer(
            [name for name, _ in cfg.architecture_rule],
            cfg.model,
            num_classes=info.num_classes,
            in_shape=info.image_shape,
            model_width=cfg.model_width,
        )
        if state_signature(state) != state_signature(zoo.full.state_dict()):
            raise ValueError(
                f"the server sent weights that fit neither this node's architecture {arch!r} "
                "nor the zoo of the run's: are server and node on the same architectures?"
            )
        state = zoo.slice(state, arch)
    elif rate != 1.0 and state_signature(state) != state_signature(model.state_dict()):
        slicer = WidthSlicer(
            cfg.model,
            num_classes=info.num_classes,
            in_shape=info.image_shape,
            model_width=cfg.model_width,
            rolling=cfg.width_scheme == "rolling",
        )
        if state_signature(state) != state_signature(slicer.full.state_dict()):
            raise ValueError(
                f"the server sent weights that fit neither this node's width {rate:g} nor the "
                "full model: are server and node on the same width-tiers and model?"
            )
        if window_start is None:
            window_start = slicer.window_start(int(msg.content["config"]["server-round"]))
        state = slicer.slice(state, rate, window_start)
    model.load_state_dict(state)
    return model


def _local_data(cfg: RunConfig, context: Context) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This node's training data: its own folder (``data-dir``), else its share of the public
    dataset's train split, split as every node of the run splits it."""
    partition_id, num_partitions = _identity(context)
    if (folder := _data_dir(context)) is not None:
        images, labels = read_split(folder, TRAIN, dataset_info(cfg.dataset))
        return images, labels, partition_id
    assert num_partitions is not None  # _identity requires it without a data-dir
    images, labels = load_client_partition(
        cfg.dataset,
        data_root(cfg, context.node_config),
        partition_id,
        num_partitions,
        cfg.partitioning,
        alpha=cfg.alpha,
        classes_per_partition=cfg.classes_per_client,
        min_partition_size=cfg.min_partition_size,
        seed=cfg.data_seed,
    )
    return images, labels, partition_id


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD from the global weights; prototypes and the generator when asked."""
    cfg = parse_run_config(context.run_config)
    server_round = int(msg.content["config"]["server-round"])
    instructions = RoundInstructions.from_config(msg.content["config"])
    device = resolve_device(cfg.device)
    info = dataset_info(cfg.dataset)
    images, labels, partition_id = _local_data(cfg, context)
    seed = cfg.seed + 1000 * partition_id + server_round
    rate = _width(cfg, context)
    arch = _arch(cfg, context)
    model = _model_from(cfg, msg, rate, arch=arch)

    # Prototypes describe the data under the *global* model (whose feature space the experts'
    # heads share), so they are taken before local training moves the model away from it.
    prototypes = None
    if instructions.send_prototypes:
        prototypes = compute_prototypes(
            model,
            images,
            labels,
            per_class=cfg.protos_per_class,
            min_samples=cfg.min_proto_samples,
            device=device,
            seed=seed,
            max_samples=cfg.proto_max_samples,
        )

    local = cfg.local_training(len(labels), instructions.lr, instructions.proximal_mu)
    result = train_local(model, images, labels, local, device=device, seed=seed)
    counts = label_counts(labels, info.num_classes)

    generator_state = None
    if instructions.train_generator:
        log(INFO, "client %d: training its generator (%d steps)", partition_id, cfg.gen_steps)
        trained = train_generator(
            model,
            images,
            cfg.generator_training,
            spec=GeneratorSpec(cfg.gen_latent_dim, info.image_shape, cfg.gen_channels).at_rate(
                rate
            ),
            to_input=lambda x: generator_to_classifier_input(x, info),
            label_counts=counts,
            device=device,
            seed=seed,
            progress=lambda line: log(INFO, "client %d generator: %s", partition_id, line),
        )
        generator_state = trained.generator.state_dict()

    reply = pack_train_reply(
        model.state_dict(),
        num_examples=len(labels),
        train_loss=result.mean_loss,
        partition_id=partition_id,
        label_counts=counts,
        prototypes=prototypes,
        generator_state=generator_state,
        width=rate,
        arch=arch,
    )
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Score the global weights on this node's held-out data (with width tiers, the node's own
    sub-model of them: the first units of each layer): its folder's ``test.npz`` when it has a
    ``data-dir``, else its IID share of the public test split."""
    cfg = parse_run_config(context.run_config)
    partition_id, num_partitions = _identity(context)
    if (folder := _data_dir(context)) is not None:
        images, labels = read_split(folder, TEST, dataset_info(cfg.dataset))
    else:
        assert num_partitions is not None  # _identity requires it without a data-dir
        images, labels = load_dataset(cfg.dataset, data_root(cfg, context.node_config), False)
        shard = partition_indices(labels.numpy(), num_partitions, "iid", seed=cfg.data_seed)[
            partition_id
        ]
        images, labels = images[shard], labels[shard]
    model = _model_from(cfg, msg, _width(cfg, context), window_start=0, arch=_arch(cfg, context))
    result = evaluate(model, images, labels, resolve_device(cfg.device))
    metrics = MetricRecord(
        {"num-examples": result.num_examples, "accuracy": result.accuracy, "loss": result.loss}
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
