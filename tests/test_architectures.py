"""Mixed architectures: the rule, the zoo as the server's model, experts across groups, the
declaration check, and whole in-process runs of clients of three families."""

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message

from common.architectures import (
    MIX,
    ArchitectureSlicer,
    ModelZoo,
    assign_architectures,
    node_architecture,
    parse_architectures,
)
from common.config import ConfigError
from common.models import build_classifier
from common.submodels import average_covered
from common.wire import (
    CLIENT,
    MalformedReplyError,
    TierShapes,
    pack_train_reply,
    state_signature,
    validate_train_reply,
)
from server_app.moe import ExpertEnsemble, build_experts
from server_app.strategies import validate_run_config
from tests.fakedata import tiny_run_config, write_fake_fashion_mnist
from tests.runs import NUM_NODES, read_json, run

NAMES = ("cnn", "resnet8", "mlp")
SHAPE = (1, 28, 28)


def _slicer() -> ArchitectureSlicer:
    return ArchitectureSlicer(NAMES, "cnn", num_classes=10, in_shape=SHAPE, model_width=0.25)


def _member(name: str, seed: int) -> dict[str, torch.Tensor]:
    """A member's state with random weights and statistics (a trained client stands in)."""
    torch.manual_seed(seed)
    model = build_classifier(name, num_classes=10, in_shape=SHAPE, width=0.25)
    state = model.state_dict()
    for key, tensor in state.items():
        if tensor.is_floating_point():
            tensor.copy_(
                torch.rand_like(tensor) + 0.1
                if "running_var" in key
                else torch.randn_like(tensor) * 0.1
            )
    return state


# --- the rule ---------------------------------------------------------------------------------
@pytest.mark.unit
def test_the_rule_deals_exact_counts_reproducibly_and_a_node_may_name_its_own() -> None:
    rule = parse_architectures("cnn:4,resnet8:3,mlp:3")
    archs = assign_architectures(rule, 10, seed=0)
    assert sorted(archs) == sorted(["cnn"] * 4 + ["resnet8"] * 3 + ["mlp"] * 3)
    assert assign_architectures(rule, 10, seed=0) == archs
    assert assign_architectures(rule, 10, seed=1) != archs
    assert node_architecture(rule, {"arch": "mlp"}, 0, 10, seed=0) == "mlp"
    assert node_architecture(rule, {}, 3, 10, seed=0) == archs[3]
    with pytest.raises(ValueError, match="arch='vit' is not an architecture"):
        node_architecture(rule, {"arch": "vit"}, 0, 10, seed=0)
    with pytest.raises(ValueError, match='add arch="<name>"'):
        node_architecture(rule, {}, 0, None, seed=0)
    with pytest.raises(ValueError, match="architectures: 3 architectures need at least"):
        assign_architectures(rule, 2, seed=0)


@pytest.mark.unit
@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"architectures": "cnn:2,vit:1"}, "architectures"),
        ({"architectures": "cnn:2"}, "architectures"),
        ({"architectures": "cnn:2,cnn:1"}, "architectures"),
        ({"architectures": "cnn:0,mlp:1"}, "architectures"),
        ({"architectures": "mlp:2,resnet8:1", "model": "cnn"}, "model"),
        ({"architectures": "cnn:2,mlp:1", "width-tiers": "1:2,0.5:1"}, "width-tiers"),
        ({"architectures": "cnn:2,mlp:1", "aggregation": "median"}, "aggregation"),
        ({"architectures": "cnn:2,mlp:1", "strategy": "mosaic"}, "architectures"),
    ],
)
def test_impossible_architecture_configs_fail_naming_the_key(tmp_path, overrides, key) -> None:
    with pytest.raises(ConfigError, match=f"\n  {key}: "):
        validate_run_config(
            tiny_run_config(tmp_path, tmp_path, **{"strategy": "fedavg"}) | overrides
        )


# --- the zoo ----------------------------------------------------------------------------------
@pytest.mark.unit
def test_a_member_embedded_in_zeros_computes_what_the_member_computes() -> None:
    slicer = _slicer()
    x = torch.randn(4, *SHAPE)
    for seed, name in enumerate(NAMES):
        state = _member(name, seed)
        member = build_classifier(name, num_classes=10, in_shape=SHAPE, width=0.25).eval()
        member.load_state_dict(state)
        zoo = ModelZoo(NAMES, num_classes=10, in_shape=SHAPE, width=0.25).eval()
        zoo.load_state_dict(slicer.padded(state, name))
        torch.testing.assert_close(zoo(x), member(x))
        assert slicer.slice(zoo.state_dict(), name).keys() == state.keys()


@pytest.mark.unit
def test_fedavg_over_a_zoo_averages_each_architecture_over_its_own_clients() -> None:
    slicer = _slicer()
    base = slicer.full.state_dict()
    clients = [("cnn", 0, 10), ("cnn", 1, 30), ("mlp", 2, 5)]  # (arch, seed, samples)
    embedded = [slicer.embed(_member(a, s), a, 0, base) for a, s, _ in clients]
    average = average_covered(
        [e[0] for e in embedded], [e[1] for e in embedded], [n for *_, n in clients], base
    )
    first, second = _member("cnn", 0), _member("cnn", 1)
    for key in first:
        if first[key].is_floating_point():
            expected = (10 * first[key].double() + 30 * second[key].double()) / 40
            torch.testing.assert_close(average[f"members.cnn.{key}"], expected.float())
    mlp = _member("mlp", 2)
    for key in mlp:
        torch.testing.assert_close(average[f"members.mlp.{key}"], mlp[key])
    for key, tensor in base.items():  # nobody ran the ResNet: it keeps its value
        if key.startswith("members.resnet8."):
            assert torch.equal(average[key], tensor)
    torch.testing.assert_close(average[MIX], torch.tensor([40 / 45, 0.0, 5 / 45]))
    assert torch.equal(slicer.global_state(average)[MIX], torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.unit
def test_experts_mix_each_groups_class_expert_by_the_groups_share_of_the_class() -> None:
    slicer = _slicer()
    clients = [("cnn", 0), ("cnn", 1), ("mlp", 2), ("resnet8", 3)]
    counts = np.array([[6, 0], [2, 4], [8, 0], [0, 0]])  # class 0: cnn 8, mlp 8; class 1: cnn 4
    zeros = {k: torch.zeros_like(v) for k, v in slicer.full.state_dict().items()}
    fallback = slicer.full.state_dict()
    embedded = [slicer.embed(_member(a, s), a, 0, zeros) for a, s in clients]
    experts = build_experts(
        [e[0] for e in embedded], counts, masks=[e[1] for e in embedded], fallback=fallback
    )
    assert sorted(experts) == [0, 1]
    torch.testing.assert_close(experts[0][MIX], torch.tensor([0.5, 0.0, 0.5], dtype=torch.float32))
    torch.testing.assert_close(experts[1][MIX], torch.tensor([1.0, 0.0, 0.0]))
    # class 0's CNN expert: the two CNN clients weighted 6 : 2
    a, b = _member("cnn", 0), _member("cnn", 1)
    key = "body.0.weight"
    torch.testing.assert_close(experts[0][f"members.cnn.{key}"], (6 * a[key] + 2 * b[key]) / 8)
    # class 1 has no MLP holder: the member falls back to the global one (and weighs 0)
    assert torch.equal(experts[1]["members.mlp.head.weight"], fallback["members.mlp.head.weight"])
    # the expert computes the group-share mixture of its groups' experts' probabilities
    x = torch.randn(3, *SHAPE)
    ensemble = ExpertEnsemble(slicer.full, experts)
    cnn = build_classifier("cnn", num_classes=10, in_shape=SHAPE, width=0.25).eval()
    cnn.load_state_dict(slicer.slice(experts[0], "cnn"))
    mlp = build_classifier("mlp", num_classes=10, in_shape=SHAPE, width=0.25).eval()
    mlp.load_state_dict(slicer.slice(experts[0], "mlp"))
    mixture = 0.5 * cnn(x).softmax(-1) + 0.5 * mlp(x).softmax(-1)
    torch.testing.assert_close(ensemble(x)[:, 0].softmax(-1), mixture, atol=1e-5, rtol=1e-4)


# --- the declaration ------------------------------------------------------------------------
def _validate(content):
    slicer = _slicer()
    shapes = {
        name: TierShapes(
            model=state_signature(slicer.template(name).state_dict()),
            feature_dim=slicer.template(name).feature_dim,
            generator=None,
        )
        for name in NAMES
    }
    return validate_train_reply(
        content,
        model_signature=state_signature(slicer.full.state_dict()),
        num_classes=10,
        feature_dim=0,
        protos_per_class=1,
        prototypes_expected=False,
        generator_signature=None,
        sub_models=shapes,
    )


def _reply(name: str, arch: str | None):
    state = _member(name, 0)
    return pack_train_reply(
        state,
        num_examples=10,
        train_loss=0.1,
        partition_id=0,
        label_counts=[10] + [0] * 9,
        arch=arch,
    )


@pytest.mark.unit
def test_a_reply_is_checked_against_the_architecture_it_declares() -> None:
    assert _validate(_reply("mlp", "mlp")).sub_model == "mlp"
    with pytest.raises(MalformedReplyError, match="arch-declaration: declared cnn"):
        _validate(_reply("mlp", "cnn"))  # an MLP's weights declared as a CNN
    with pytest.raises(MalformedReplyError) as error:
        _validate(_reply("mlp", None))  # every reply of a mixed federation declares one
    assert error.value.rule == "arch"
    with pytest.raises(MalformedReplyError) as error:
        _validate(_reply("mlp", "vit"))
    assert error.value.rule == "arch"


# --- whole runs -------------------------------------------------------------------------------
ARCHS = "cnn:1,resnet8:1,mlp:1"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data"))


def _archs(data_root: Path, tmp_path: Path) -> dict[int, str]:
    """Node id -> its architecture under the rule (node n answers for partition n - 1)."""
    seed = tiny_run_config(data_root, tmp_path)["seed"]
    archs = assign_architectures(parse_architectures(ARCHS), NUM_NODES, seed)
    return {partition + 1: arch for partition, arch in enumerate(archs)}


@pytest.mark.integration
@pytest.mark.parametrize("one_shot", [True, False])
def test_a_mixed_architecture_federation_distills_every_member(
    data_root, tmp_path, one_shot
) -> None:
    rounds = {"num_rounds": 1, "kd_round": 1} if one_shot else {}
    _, folder = run(
        data_root,
        tmp_path,
        strategy="mosaic-no-meta",
        architectures=ARCHS,
        kd_sub_models=True,
        **rounds,
    )
    participation = read_json(folder, "participation.json")
    assert all(not e["rejected"] and len(e["replied"]) == 3 for e in participation.values())
    kd_round = "1" if one_shot else "2"
    metrics = read_json(folder, "metrics.json")["rounds"]
    for name in ("cnn", "resnet8", "mlp"):
        assert {f"pre-kd-arch-{name}-accuracy", f"post-kd-arch-{name}-accuracy"} <= metrics[
            kd_round
        ].keys()
    assert metrics[kd_round]["post-kd-accuracy"] == metrics[kd_round]["post-kd-arch-cnn-accuracy"]
    # the final model is the zoo; after round 1 each node is sent its own member only
    archs = _archs(data_root, tmp_path)
    if not one_shot:
        sizes = {n: participation["2"]["traffic"][str(n)]["downlink"]["arrays"] for n in archs}
        first = participation["1"]["traffic"]["1"]["downlink"]["arrays"]
        assert all(size < first for size in sizes.values())
        assert len(set(sizes.values())) == 3


def _declare(node: int, arch: str):
    """A tamper: ``node`` declares ``arch`` whatever it trained."""

    def tamper(node_id: int, reply: Message) -> Message:
        if node_id == node and not reply.has_error() and CLIENT in reply.content:
            client = dict(reply.content[CLIENT].items())
            reply.content[CLIENT] = ConfigRecord({**client, "arch": arch})
        return reply

    return tamper


@pytest.mark.integration
def test_fedavg_per_group_and_a_lie_about_the_architecture_is_rejected(data_root, tmp_path) -> None:
    archs = _archs(data_root, tmp_path)
    mlp = next(node for node, arch in archs.items() if arch == "mlp")
    _, folder = run(
        data_root, tmp_path, tamper=_declare(mlp, "cnn"), strategy="fedavg", architectures=ARCHS
    )
    participation = read_json(folder, "participation.json")
    assert participation["1"]["rejected"] == {str(mlp): "arch-declaration"}
    metrics = read_json(folder, "metrics.json")["rounds"]
    assert metrics["3"]["arch-cnn-accuracy"] > metrics["0"]["arch-cnn-accuracy"]


# --- the meta model on generated images ------------------------------------------------------
@pytest.mark.unit
def test_generated_meta_samples_are_labelled_by_their_owner_within_its_classes(tmp_path) -> None:
    from common.config import parse_run_config
    from common.models import GeneratorSpec, build_generator
    from server_app.strategies.teacher import ClientModels
    from tests.runs import build_strategy

    config = tiny_run_config(tmp_path, tmp_path, strategy="mosaic", meta_input="generated")
    cfg = parse_run_config({**config, "model-width": 1.0, "meta-samples": 64})
    strategy = build_strategy(cfg)
    spec = GeneratorSpec(cfg.gen_latent_dim, (1, 28, 28), cfg.gen_channels)
    states, counts = [], np.zeros((2, 10), dtype=int)
    for pid in (4, 7):
        torch.manual_seed(pid)
        strategy.generators[pid] = build_generator(spec).state_dict()
        states.append(build_classifier("cnn", num_classes=10, in_shape=SHAPE).state_dict())
    counts[0, [1, 3]] = 50  # partition 4 holds classes 1 and 3, partition 7 every class
    counts[1, :] = 5
    head = states[0]["head.weight"]  # its model calls every sample 1 or 5, by the sign of w.f
    head[1], head[5] = 5 * torch.randn_like(head[1]), 0
    head[1] -= head[1].mean()
    states[0]["head.bias"][[1, 5]] = 20.0
    clients = ClientModels(states, counts, partition_ids=[4, 7])

    strategy.cfg = cfg.model_copy(update={"meta_min_confidence": 0.0})
    images, classes = strategy.labelled_samples(clients)
    assert tuple(images.shape[1:]) == (1, 28, 28) and len(images) == len(classes)
    # the first owner's samples keep only the classes it holds (1, not 5)
    first = strategy.labelled_samples(ClientModels(states[:1], counts[:1], partition_ids=[4]))[1]
    assert 0 < len(first) < 64 and set(first.tolist()) == {1}
    assert len(classes) == len(first) + 64  # the second holds every class: all 64 kept
    strategy.cfg = cfg.model_copy(update={"meta_min_confidence": 1.0})
    assert len(strategy.labelled_samples(clients)[1]) == 0  # nothing is that confident


@pytest.mark.integration
def test_mosaic_trains_its_meta_model_on_generated_images_across_architectures(
    data_root, tmp_path
) -> None:
    _, folder = run(
        data_root,
        tmp_path,
        strategy="mosaic",
        architectures=ARCHS,
        meta_input="generated",
        meta_min_confidence=0.0,
    )
    metrics = read_json(folder, "metrics.json")["rounds"]
    assert metrics["2"]["meta-samples"] > 0
    assert {"meta-val-accuracy", "prior-accuracy", "teacher-accuracy"} <= metrics["2"].keys()
    participation = read_json(folder, "participation.json")
    for round_log in participation.values():  # no prototypes were asked for, none came
        assert not round_log["rejected"]
        assert all("prototypes" not in t["uplink"] for t in round_log["traffic"].values())


@pytest.mark.unit
def test_a_zoo_computes_finite_only_if_every_member_does() -> None:
    from server_app.defences import computes_finite

    zoo = ModelZoo(NAMES, num_classes=10, in_shape=SHAPE, width=0.25, active="cnn")
    probe = torch.randn(2, *SHAPE)
    assert computes_finite(zoo, probe)
    with torch.no_grad():  # a ResNet-8 statistic that is finite but divides by zero
        zoo.members["resnet8"].body[1].running_var.fill_(0.0)
        zoo.members["resnet8"].body[1].eps = 0.0
    assert not computes_finite(zoo, probe)
