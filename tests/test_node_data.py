"""A site's own data folder: written from a public set, read back, refused with a clear error
when it is not what the layout says, and trained on by the ClientApp without a partition id."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_app.app import evaluate_local, train
from common.config import parse_run_config
from common.data import dataset_info, load_client_partition, load_dataset
from common.models import build_classifier
from common.node_data import (
    TEST,
    TRAIN,
    NodeDataError,
    content_id,
    main,
    read_split,
    write_node_folders,
)
from common.wire import ARRAYS, CLIENT, state_to_record
from tests.fakedata import tiny_run_config, write_fake_fashion_mnist

FASHION = dataset_info("fashion-mnist")
CIFAR = dataset_info("cifar10")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def nodes(data_root, tmp_path_factory) -> list[Path]:
    return write_node_folders("fashion-mnist", data_root, tmp_path_factory.mktemp("nodes"), 3)


def test_written_folders_hold_the_simulations_partitions_and_the_test_split(
    data_root, nodes
) -> None:
    assert [folder.name for folder in nodes] == ["node-0", "node-1", "node-2"]
    test_rows = 0
    for i, folder in enumerate(nodes):
        images, labels = read_split(folder, TRAIN, FASHION)
        expected_images, expected_labels = load_client_partition(
            "fashion-mnist", data_root, i, 3, "dirichlet", alpha=0.5, seed=0
        )
        torch.testing.assert_close(images, expected_images)
        assert torch.equal(labels, expected_labels)
        test_rows += len(read_split(folder, TEST, FASHION)[1])
    assert test_rows == len(load_dataset("fashion-mnist", data_root, train=False)[1])


def test_a_nodes_id_comes_from_its_data_and_stays_put(nodes) -> None:
    ids = [content_id(folder) for folder in nodes]
    assert len(set(ids)) == 3 and all(0 <= i < 2**31 for i in ids)
    assert content_id(nodes[0]) == ids[0]


def test_channels_last_and_grayscale_without_a_channel_axis_are_read(tmp_path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / TRAIN, images=pixels, labels=np.array([0, 1, 2, 9]))
    images, labels = read_split(tmp_path, TRAIN, CIFAR)
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    red = (pixels[1, 5, 7, 0] / 255 - CIFAR.mean[0]) / CIFAR.std[0]
    assert images[1, 0, 5, 7].item() == pytest.approx(red, abs=1e-5)

    np.savez(tmp_path / TEST, images=pixels[..., 0][:, 2:30, 2:30], labels=np.array([1, 2, 3, 4]))
    assert read_split(tmp_path, TEST, FASHION)[0].shape == (4, 1, 28, 28)


@pytest.mark.parametrize(
    ("images", "labels", "says"),
    [
        (np.zeros((2, 30, 30), np.uint8), np.array([0, 1]), "do not fit fashion-mnist"),
        (np.zeros((2, 28, 28), np.float32), np.array([0, 1]), "not uint8"),
        (np.zeros((2, 28, 28), np.uint8), np.array([0, 10]), "classes 0..9"),
        (np.zeros((2, 28, 28), np.uint8), np.array([0.5, 1.0]), "integers"),
        (np.zeros((3, 28, 28), np.uint8), np.array([0, 1]), "3 images and 2 labels"),
    ],
)
def test_a_folder_not_in_the_layout_is_refused_naming_the_file(
    tmp_path, images, labels, says
) -> None:
    np.savez(tmp_path / TRAIN, images=images, labels=labels)
    with pytest.raises(NodeDataError, match=says) as error:
        read_split(tmp_path, TRAIN, FASHION)
    assert str(tmp_path / TRAIN) in str(error.value)


def test_a_missing_folder_names_the_path_and_the_layout(tmp_path) -> None:
    with pytest.raises(NodeDataError, match=r"no such file.*expected <data-dir>/train\.npz"):
        read_split(tmp_path / "nowhere", TRAIN, FASHION)
    (tmp_path / TRAIN).write_bytes(b"not an archive of images and labels")
    with pytest.raises(NodeDataError, match="unreadable"):
        read_split(tmp_path, TRAIN, FASHION)


def test_the_command_writes_the_folders_and_says_how_to_start_each_node(
    data_root, tmp_path, capsys
) -> None:
    assert main([str(tmp_path), "--root", str(data_root), "--partitions", "2"]) == 0
    assert (tmp_path / "node-1" / TEST).is_file()
    assert "data-dir=" in capsys.readouterr().out


# --- the ClientApp on a node's own folder ---------------------------------------------------


def _context(run_config: dict, node_config: dict) -> Context:
    return Context(1, 7, node_config, RecordDict(), dict(run_config))


def _message(run_config: dict, message_type: str) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    cfg = parse_run_config(run_config)
    model = build_classifier(cfg.model, num_classes=10, in_shape=(1, 28, 28), width=cfg.model_width)
    config = ConfigRecord({"server-round": 1, "lr": cfg.lr})
    content = RecordDict({ARRAYS: state_to_record(model.state_dict()), "config": config})
    return Message(content, dst_node_id=1, message_type=message_type)


def test_a_node_on_its_own_folder_trains_and_evaluates_with_no_partition_id(
    data_root, nodes, tmp_path
) -> None:
    run_config = tiny_run_config(data_root, tmp_path)
    node_config = {"data-dir": str(nodes[1])}
    reply = train(_message(run_config, "train"), _context(run_config, node_config))
    assert reply.content[CLIENT]["partition-id"] == content_id(nodes[1])
    _, labels = read_split(nodes[1], TRAIN, FASHION)
    counts = list(reply.content["label-counts"]["counts"])
    assert counts == np.bincount(labels.numpy(), minlength=10).tolist()

    scored = evaluate_local(_message(run_config, "evaluate"), _context(run_config, node_config))
    assert scored.content["metrics"]["num-examples"] == len(read_split(nodes[1], TEST, FASHION)[1])


def test_a_bad_data_dir_fails_at_the_client_naming_the_path(data_root, tmp_path) -> None:
    run_config = tiny_run_config(data_root, tmp_path)
    missing = tmp_path / "no-such-site"
    with pytest.raises(NodeDataError, match=re.escape(str(missing))):
        train(_message(run_config, "train"), _context(run_config, {"data-dir": str(missing)}))


def test_width_tiers_need_a_width_from_a_node_without_a_partition_count(
    data_root, nodes, tmp_path
) -> None:
    run_config = tiny_run_config(data_root, tmp_path, width_tiers="1:1,0.5:1")
    with pytest.raises(ValueError, match="width=<rate>"):
        train(_message(run_config, "train"), _context(run_config, {"data-dir": str(nodes[0])}))


# --- a whole run on the sites' own folders, with no test set at the server ------------------


@pytest.mark.integration
def test_mosaic_on_node_folders_without_a_server_test_set_is_judged_by_federated_evaluation(
    data_root, nodes, tmp_path
) -> None:
    from server_app.inprocess import run_inprocess
    from server_app.results import RunResults

    config = tiny_run_config(
        data_root,
        tmp_path,
        strategy="mosaic",
        num_rounds=2,
        kd_round=2,
        proto_start_round=1,
        server_test_set=False,
        fraction_evaluate=1.0,
        min_nodes=3,
    )
    grid = run_inprocess(
        config, 3, node_configs={i + 1: {"data-dir": str(folder)} for i, folder in enumerate(nodes)}
    )
    results = RunResults.read(tmp_path / config["run-name"])
    assert {r for r, v in results.rounds.items() if "federated-accuracy" in v} == {1, 2}
    assert not any("accuracy" in v for v in results.rounds.values())  # no server test set
    assert "kd-seconds" in results.rounds[2]  # distillation ran with nothing to score it on
    assert results.summary_lines()[0].startswith("final federated accuracy (clients' held-out")
    assert sorted(results.label_counts) == sorted(f"client-{content_id(f)}" for f in nodes)
    sent = [msg for msg in grid.sent if msg.metadata.message_type == "evaluate"]
    assert len(sent) == 6  # every node scored the global model after both rounds


def test_a_server_without_a_test_set_needs_the_clients_to_evaluate(data_root, tmp_path) -> None:
    with pytest.raises(ValueError, match="fraction-evaluate"):
        parse_run_config(tiny_run_config(data_root, tmp_path, server_test_set=False))
