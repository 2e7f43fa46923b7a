"""Width sub-models: slices, the per-coordinate average, experts with a fallback, tier rules."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from common.config import ConfigError, pyproject_defaults
from common.models import GeneratorSpec, build_generator
from common.submodels import SlicedView, WidthSlicer, average_covered
from common.tiers import assign_widths, node_width, parse_width_tiers
from common.wire import (
    MalformedReplyError,
    TierShapes,
    TrainReply,
    pack_train_reply,
    record_to_state,
    state_signature,
)
from common.wire import validate_train_reply as validate
from server_app.moe import build_experts
from server_app.strategies import validate_run_config
from server_app.strategies.base import Accepted
from server_app.strategies.teacher import with_statistics
from tests.fakedata import PYPROJECT
from tests.runs import build_strategy

IMAGE = (1, 28, 28)


def _slicer(rolling: bool = False) -> WidthSlicer:
    torch.manual_seed(0)
    return WidthSlicer("cnn", num_classes=10, in_shape=IMAGE, rolling=rolling)


def _randomised(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state with every tensor random (BatchNorm statistics too, variances positive)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            value = torch.rand(tensor.shape, generator=generator) + 0.5
            state[key] = value if "running_var" in key else value - 1.0
        else:
            state[key] = torch.randint(0, 100, tensor.shape, generator=generator)
    return state


def test_static_slice_keeps_the_first_units_and_the_flatten_blocks_of_the_dense_layer() -> None:
    slicer = _slicer()
    full = _randomised(slicer.full, 1)
    sub = slicer.slice(full, 0.5)
    # SmallCNN 32-64-128 at half width: 16-32-64; conv2's channel c is dense columns c*49..+49
    assert torch.equal(sub["body.0.weight"], full["body.0.weight"][:16])
    assert torch.equal(sub["body.4.weight"], full["body.4.weight"][:32, :16])
    assert torch.equal(sub["body.5.running_var"], full["body.5.running_var"][:32])
    assert torch.equal(sub["body.9.weight"], full["body.9.weight"][:64, : 32 * 49])
    assert torch.equal(sub["head.weight"], full["head.weight"][:, :64])
    assert torch.equal(sub["head.bias"], full["head.bias"])  # the classes are never cut
    assert torch.equal(sub["body.1.num_batches_tracked"], full["body.1.num_batches_tracked"])
    assert state_signature(sub) == state_signature(slicer.template(0.5).state_dict())


def test_rolling_slice_wraps_around_and_moves_every_layer_by_the_round() -> None:
    slicer = _slicer(rolling=True)
    full = _randomised(slicer.full, 2)
    start = slicer.window_start(40)
    sub = slicer.slice(full, 0.5, start)
    conv2 = [*range(40, 64), *range(0, 8)]  # 32 of 64 channels from unit 40, wrapping
    dense = list(range(40, 104))  # 64 of 128 units from 40
    conv1 = [*range(8, 24)]  # 16 of 32 from 40 mod 32 = 8
    columns = torch.cat([torch.arange(c * 49, (c + 1) * 49) for c in conv2])
    assert torch.equal(sub["body.0.weight"], full["body.0.weight"][conv1])
    assert torch.equal(sub["body.4.weight"], full["body.4.weight"][conv2][:, conv1])
    assert torch.equal(sub["body.9.weight"], full["body.9.weight"][dense][:, columns])
    assert torch.equal(sub["head.weight"], full["head.weight"][:, dense])
    assert _slicer().window_start(40) == 0  # static slices never move


@pytest.mark.parametrize("rate, start", [(0.5, 0), (0.25, 3), (0.5, 77)])
def test_a_padded_sub_model_computes_what_the_sub_model_computes(rate, start) -> None:
    slicer = _slicer(rolling=True)
    sub_model = copy.deepcopy(slicer.template(rate)).eval()
    sub_model.load_state_dict(_randomised(sub_model, 3))
    padded = copy.deepcopy(slicer.full).eval()
    padded.load_state_dict(slicer.padded(sub_model.state_dict(), rate, start))
    x = torch.randn(5, *IMAGE)
    torch.testing.assert_close(padded(x), sub_model(x), rtol=1e-5, atol=1e-5)


def test_embed_puts_a_slice_back_where_it_was_cut_and_marks_it() -> None:
    slicer = _slicer(rolling=True)
    full = _randomised(slicer.full, 4)
    sub = slicer.slice(full, 0.25, 5)
    zeros = {key: torch.zeros_like(value) for key, value in full.items()}
    embedded, masks = slicer.embed(sub, 0.25, 5, zeros)
    for key, value in full.items():
        assert torch.equal(embedded[key][masks[key]], value[masks[key]]), key
        assert not embedded[key][~masks[key]].any(), key
    assert masks["body.9.weight"].sum() == 32 * 16 * 49  # rows x (channels x 49 columns)


def test_average_covered_against_hand_computed_values() -> None:
    first = {"w": torch.tensor([1.0, 2.0, 0.0, 0.0]), "n": torch.tensor(5)}
    second = {"w": torch.tensor([5.0, 0.0, 0.0, 0.0]), "n": torch.tensor(9)}
    masks = [
        {"w": torch.tensor([True, True, False, False]), "n": torch.tensor(True)},
        {"w": torch.tensor([True, False, False, True]), "n": torch.tensor(True)},
    ]
    fallback = {"w": torch.tensor([9.0, 9.0, 9.0, 9.0]), "n": torch.tensor(1)}
    out = average_covered([first, second], masks, [1.0, 3.0], fallback)
    # coordinate 0: (1*1 + 3*5) / 4; 1: only the first; 2: nobody -> fallback; 3: the second's 0
    assert torch.equal(out["w"], torch.tensor([4.0, 2.0, 9.0, 0.0]))
    assert out["n"] == 9  # integer buffers: the largest among those that hold them
    only_first = average_covered([first, second], masks, [1.0, 0.0], fallback)
    assert torch.equal(only_first["w"], torch.tensor([1.0, 2.0, 9.0, 9.0]))  # zero weight: unheld


def test_average_covered_of_equal_full_models_is_plain_fedavg() -> None:
    slicer = _slicer()
    states = [_randomised(slicer.full, seed) for seed in (5, 6)]
    masks = [{k: torch.ones_like(v, dtype=torch.bool) for k, v in states[0].items()}] * 2
    out = average_covered(states, masks, [1.0, 3.0], states[0])
    for key, value in out.items():
        if value.is_floating_point():
            expected = (states[0][key].double() + 3 * states[1][key].double()) / 4
            torch.testing.assert_close(value, expected.float())


def test_experts_average_each_coordinate_over_the_holders_of_the_class_that_trained_it() -> None:
    slicer = _slicer()
    full_client = _randomised(slicer.full, 7)
    small_client = _randomised(slicer.template(0.25), 8)
    global_state = _randomised(slicer.full, 9)
    zeros = {key: torch.zeros_like(value) for key, value in global_state.items()}
    embedded = [
        slicer.embed(full_client, 1.0, 0, zeros),
        slicer.embed(small_client, 0.25, 0, zeros),
    ]
    states, masks = [s for s, _ in embedded], [m for _, m in embedded]
    counts = np.array([[0, 5, 1], [4, 0, 3]])  # class 0 only at the small client
    experts = build_experts(list(states), counts, masks=list(masks), fallback=global_state)
    w = "body.0.weight"
    # class 0: the small client's 8 channels, the global model's elsewhere (never zero)
    assert torch.equal(experts[0][w][:8], small_client[w])
    assert torch.equal(experts[0][w][8:], global_state[w][8:])
    # class 2: both hold it; 1*full + 3*small on the first 8 channels, the full client's beyond
    torch.testing.assert_close(experts[2][w][:8], (full_client[w][:8] + 3 * small_client[w]) / 4)
    assert torch.equal(experts[2][w][8:], full_client[w][8:])
    assert torch.equal(experts[1][w], full_client[w])


def test_batchnorm_statistics_are_kept_per_tier_and_each_width_is_sent_its_own() -> None:
    cfg = validate_run_config(
        {**pyproject_defaults(PYPROJECT), "strategy": "fedavg", "width-tiers": "1:1,0.5:1,0.25:1"}
    )
    strategy = build_strategy(cfg)
    slicer = strategy.slicer
    rates = (1.0, 0.5, 0.25)
    states = [_randomised(slicer.template(rate), 20 + i) for i, rate in enumerate(rates)]
    accepted = [
        Accepted(node, None, TrainReply(state, node, rate, 100, 0.0, [10] * 10, None, None))
        for node, (rate, state) in enumerate(zip(rates, states, strict=True))
    ]
    arrays = strategy.average_sub_models(1, accepted, [None] * 3)
    average = record_to_state(arrays)
    mean, w = "body.1.running_mean", "body.0.weight"
    # weights: the plain mean of the three on the quarter window, the full client's beyond
    torch.testing.assert_close(average[w][:8], sum(state[w][:8] for state in states) / 3)
    assert torch.equal(average[w][16:], states[0][w][16:])
    # statistics: the global model's are the full tier's alone, never mixed across widths
    assert torch.equal(average[mean], states[0][mean])
    half = strategy.tier_statistics[0.5]
    assert torch.equal(half[mean][:16], states[1][mean])
    assert torch.equal(half[mean][16:], states[0][mean][16:])  # no half client: the average's
    # what a half-width node is sent and evaluated with: the shared weights, its tier's statistics
    strategy._sent_state = average
    sent = strategy.sent_slice(2, 0.5)
    assert torch.equal(sent[mean], states[1][mean])
    assert torch.equal(sent[w], average[w][:16])


def test_tier_rule_assigns_exact_counts_reproducibly_and_scales_to_other_sizes() -> None:
    tiers = parse_width_tiers("1:4,0.5:3,0.25:3")
    widths = assign_widths(tiers, 10, seed=0)
    assert sorted(widths, reverse=True) == [1.0] * 4 + [0.5] * 3 + [0.25] * 3
    assert assign_widths(tiers, 10, seed=0) == widths
    assert assign_widths(tiers, 10, seed=1) != widths
    assert sorted(assign_widths(tiers, 20, seed=0)).count(1.0) == 8
    assert sorted(assign_widths(tiers, 3, seed=0)) == [0.25, 0.5, 1.0]  # every tier kept
    with pytest.raises(ValueError, match="width-tiers: 3 tiers need at least"):
        assign_widths(tiers, 2, seed=0)
    assert assign_widths((), 4, seed=0) == [1.0] * 4


def test_node_config_width_overrides_the_rule_and_must_be_one_of_its_rates() -> None:
    tiers = parse_width_tiers("1:1,0.25:1")
    assert node_width(tiers, {"width": 0.25}, 0, 2, seed=0) == 0.25
    assert node_width(tiers, {"width": "1"}, 1, 2, seed=0) == 1.0
    with pytest.raises(ValueError, match=r"width=0\.5 is not a rate of width-tiers"):
        node_width(tiers, {"width": 0.5}, 0, 2, seed=0)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"width-tiers": "0:3"}, "width-tiers"),
        ({"width-tiers": "1.5:3"}, "width-tiers"),
        ({"width-tiers": "0.5:0"}, "width-tiers"),
        ({"width-tiers": "0.5:2,0.5:1"}, "width-tiers"),
        ({"width-tiers": "1:2,0.5:1", "model": "resnet18"}, "width-tiers"),
        ({"width-tiers": "1:2,0.5:1", "aggregation": "median"}, "aggregation"),
        ({"width-scheme": "random"}, "width-scheme"),
        (
            {"strategy": "fedavg-exclusive", "width-tiers": "1:2,0.5:1", "exclusive-width": 0.25},
            "exclusive-width",
        ),
        ({"strategy": "fedavg-exclusive", "exclusive-width": 0.5}, "exclusive-width"),
    ],
)
def test_impossible_tier_configs_fail_naming_the_key(overrides, key) -> None:
    with pytest.raises(ConfigError, match=rf"\n  {key}:"):
        validate_run_config({**pyproject_defaults(PYPROJECT), **overrides})


def _tier_reply(state, width: float, generator_state=None):
    return pack_train_reply(
        state,
        num_examples=3,
        train_loss=0.5,
        partition_id=0,
        label_counts=[1, 2] + [0] * 8,
        generator_state=generator_state,
        width=width,
    )


def _validate_tiers(content, slicer: WidthSlicer, generator_expected: bool = False):
    spec = GeneratorSpec(8, IMAGE, 8)
    sub_models = {
        0.25: TierShapes(
            model=state_signature(slicer.template(0.25).state_dict()),
            feature_dim=slicer.template(0.25).feature_dim,
            generator=state_signature(build_generator(spec.at_rate(0.25)).state_dict()),
        )
    }
    return validate(
        content,
        model_signature=state_signature(slicer.full.state_dict()),
        num_classes=10,
        feature_dim=slicer.full.feature_dim,
        protos_per_class=2,
        prototypes_expected=False,
        generator_signature=(
            state_signature(build_generator(spec).state_dict()) if generator_expected else None
        ),
        sub_models=sub_models,
    )


def test_a_reply_is_checked_against_the_width_it_declares() -> None:
    slicer = _slicer()
    small = slicer.template(0.25).state_dict()
    assert _validate_tiers(_tier_reply(small, 0.25), slicer).width == 0.25
    assert _validate_tiers(_tier_reply(slicer.full.state_dict(), 1.0), slicer).width == 1.0
    for state, width in ((slicer.full.state_dict(), 0.25), (small, 1.0)):
        with pytest.raises(MalformedReplyError) as error:
            _validate_tiers(_tier_reply(state, width), slicer)
        assert error.value.rule == "width-declaration"
    with pytest.raises(MalformedReplyError) as error:
        _validate_tiers(_tier_reply(small, 0.5), slicer)  # not a width of this run
    assert error.value.rule == "width"


def test_a_small_client_uploads_a_generator_of_its_own_size() -> None:
    slicer = _slicer()
    spec = GeneratorSpec(8, IMAGE, 8)
    small_generator = build_generator(spec.at_rate(0.25)).state_dict()
    full_generator = build_generator(spec).state_dict()
    small = slicer.template(0.25).state_dict()
    reply = _validate_tiers(_tier_reply(small, 0.25, small_generator), slicer, True)
    assert reply.generator_state is not None
    with pytest.raises(MalformedReplyError) as error:
        _validate_tiers(_tier_reply(small, 0.25, full_generator), slicer, True)
    assert error.value.rule == "generator-shape"
    sizes = [sum(v.numel() for v in s.values()) for s in (small_generator, full_generator)]
    assert sizes[0] * 3 < sizes[1]


def test_a_sliced_view_computes_the_sub_model_and_trains_the_full_models_coordinates() -> None:
    slicer = _slicer()
    full = copy.deepcopy(slicer.full)
    full.load_state_dict(_randomised(full, 10))
    full.eval()
    view = SlicedView(slicer, full, 0.25)
    sub = copy.deepcopy(slicer.template(0.25)).eval()
    sub.load_state_dict(slicer.slice(full.state_dict(), 0.25))
    x = torch.randn(4, *IMAGE)
    torch.testing.assert_close(view(x), sub(x))
    assert not list(view.parameters())  # its weights are the full model's, not its own
    view(x).square().sum().backward()
    grad = full.body[0].weight.grad
    assert grad[:8].abs().sum() > 0 and not grad[8:].any()  # only the slice's channels move


def test_a_view_under_a_tiers_statistics_computes_that_tier_and_trains_the_shared_weights() -> None:
    slicer = _slicer()
    full = copy.deepcopy(slicer.full)
    full.load_state_dict(_randomised(full, 11))
    statistics = {k: v for k, v in _randomised(full, 12).items() if "running" in k or "num" in k}
    view = SlicedView(slicer, with_statistics(full, statistics), 0.25)
    sub = copy.deepcopy(slicer.template(0.25)).eval()
    sub.load_state_dict(slicer.slice({**full.state_dict(), **statistics}, 0.25))
    x = torch.randn(4, *IMAGE)
    torch.testing.assert_close(view(x), sub(x))
    assert not torch.equal(full.body[1].running_mean, statistics["body.1.running_mean"])
    view(x).square().sum().backward()
    assert full.body[0].weight.grad[:8].abs().sum() > 0  # the student's own weights learn
