"""The baseline teachers (server_app/strategies/baselines.py) and whole baseline runs on fake
data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.config import parse_run_config, pyproject_defaults
from common.data import dataset_info
from common.models import build_classifier
from common.wire import state_to_record
from server_app.app import phase_seconds
from server_app.moe import ExpertEnsemble, ProbabilityMixture, label_share_weights
from server_app.strategies import STRATEGIES, RoundLog
from server_app.strategies.teacher import ClientModels
from tests.fakedata import write_fake_fashion_mnist
from tests.runs import build_strategy, read_json, run


class FixedLogits(nn.Module):
    """A stand-in classifier whose logits for every input are its ``bias`` parameter."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_gives_clients_the_same_lr_schedule(name: str) -> None:
    """Baselines do Mosaic's local work: ``lr`` up to the kd-round, ``finetune-lr`` after."""
    cfg = parse_run_config(
        {**pyproject_defaults(), "strategy": name, "lr": 0.02, "finetune-lr": 0.005}
    )
    strategy = build_strategy(cfg)
    lrs = [strategy.instructions(r).lr for r in range(1, cfg.num_rounds + 1)]
    assert lrs == [0.02] * cfg.kd_round + [0.005] * (cfg.num_rounds - cfg.kd_round)


def test_label_share_weights_are_each_clients_share_of_a_class() -> None:
    counts = np.array([[3, 0, 0], [1, 4, 0]])
    expected = torch.tensor([[0.75, 0.0, 0.0], [0.25, 1.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(label_share_weights(counts), expected)


def test_label_share_teacher_weights_probabilities_by_class_share() -> None:
    logits = [torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 1.0, 0.5])]
    states = {k: {"bias": logit} for k, logit in enumerate(logits)}
    counts = np.array([[3, 1, 2], [1, 3, 2]])
    teacher = ProbabilityMixture(ExpertEnsemble(FixedLogits(), states), label_share_weights(counts))
    p0, p1 = (logit.softmax(0) for logit in logits)
    by_hand = torch.stack(
        [
            0.75 * p0[0] + 0.25 * p1[0],
            0.25 * p0[1] + 0.75 * p1[1],
            0.5 * p0[2] + 0.5 * p1[2],
        ]
    )
    out = teacher(torch.zeros(4, 1))
    assert out.shape == (4, 3)
    assert torch.allclose(out.exp(), by_hand.expand(4, -1).float(), atol=1e-6)


def test_ensemble_teacher_is_the_plain_probability_average() -> None:
    logits = [torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 1.0, 0.5])]
    states = {k: {"bias": logit} for k, logit in enumerate(logits)}
    teacher = ProbabilityMixture(ExpertEnsemble(FixedLogits(), states), torch.full((2, 3), 0.5))
    expected = (logits[0].softmax(0) + logits[1].softmax(0)) / 2
    assert torch.allclose(teacher(torch.zeros(1, 1))[0].exp(), expected, atol=1e-6)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("strategy", "distilled"),
    [("ensemble", False), ("label-share", False), ("feddf", True), ("mosaic-no-meta", True)],
)
def test_baseline_runs_in_process(data_root, tmp_path, strategy, distilled) -> None:
    _, folder = run(data_root, tmp_path, strategy=strategy)
    kd = read_json(folder, "metrics.json")["rounds"]["2"]
    assert 0.0 <= kd["teacher-accuracy"] <= 1.0
    assert "pre-kd-accuracy" in kd
    assert ("post-kd-accuracy" in kd) == distilled
    participation = json.loads((folder / "participation.json").read_text())
    assert all(len(r["replied"]) == 3 for r in participation.values())


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        (
            "mosaic",
            {
                "warm-up-rounds",
                "generator-round (local training + generator training)",
                "meta-model",
                "distillation",
                "fine-tune-rounds",
            },
        ),
        ("label-share", {"warm-up-rounds", "teacher", "distillation", "fine-tune-rounds"}),
        ("dense", {"warm-up-rounds", "teacher", "distillation", "fine-tune-rounds"}),
        ("fedavg", {"federated-rounds"}),
    ],
)
def test_phases_name_what_each_strategy_did(strategy: str, expected: set[str]) -> None:
    """Only strategies whose clients train generators get a generator-round phase."""
    cfg = parse_run_config({**pyproject_defaults(), "strategy": strategy})
    rounds = {r: RoundLog(seconds=10.0) for r in range(1, cfg.num_rounds + 1)}
    if strategy != "fedavg":  # the strategies with a teacher report its two server phases
        rounds[cfg.kd_round].mosaic = {"meta-seconds": 2.0, "kd-seconds": 3.0}
    chosen = build_strategy(cfg)
    chosen.rounds = rounds

    phases = phase_seconds(chosen)

    assert set(phases) == expected
    assert sum(phases.values()) == pytest.approx(10.0 * cfg.num_rounds)


def _teacher_of(strategy: str, states, counts, **overrides) -> nn.Module:
    """``strategy``'s teacher at the kd-round, built from ``states`` and ``counts``."""
    cfg = parse_run_config({**pyproject_defaults(), "strategy": strategy, **overrides})
    info = dataset_info(cfg.dataset)
    template = build_classifier(
        cfg.model, num_classes=info.num_classes, in_shape=info.image_shape, width=cfg.model_width
    )
    chosen = STRATEGIES[strategy](
        cfg, template, info, device=torch.device("cpu"), evaluate_model=lambda m: {}
    )
    teacher, _ = chosen.build_teacher(ClientModels(states, counts))
    return teacher


def _three_quarter_width_cnns() -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Three seeded quarter-width CNN states and a batch of six images to label."""
    torch.manual_seed(0)
    info = dataset_info("fashion-mnist")
    states = [
        build_classifier(
            "cnn", num_classes=info.num_classes, in_shape=info.image_shape, width=0.25
        ).state_dict()
        for _ in range(3)
    ]
    return states, torch.randn(6, *info.image_shape)


def test_mosaic_without_meta_training_is_the_label_share_teacher() -> None:
    """The meta model starts from the label-share prior: untrained, it *is* that teacher."""
    states, x = _three_quarter_width_cnns()
    counts = np.array([[50, 0, 3] + [1] * 7, [0, 40, 3] + [2] * 7, [5, 5, 30] + [0] * 7])
    overrides = {"model-width": 0.25}

    no_meta = _teacher_of("mosaic-no-meta", states, counts, **overrides)(x)
    label_share = _teacher_of("label-share", states, counts, **overrides)(x)
    experts_mean = _teacher_of(
        "mosaic-no-meta", states, counts, **overrides, **{"meta-prior": "experts"}
    )(x)

    torch.testing.assert_close(no_meta.log_softmax(1), label_share.log_softmax(1))
    assert not torch.allclose(experts_mean.log_softmax(1), label_share.log_softmax(1))


def test_meta_prior_clients_bounds_the_label_share_prior_to_the_strongest_holders() -> None:
    """``meta-prior-clients``: the prior runs only the kept clients' models, each class
    renormalised over them; with at least as many as there are clients it is the full prior."""
    states, x = _three_quarter_width_cnns()
    counts = np.array([[50, 0, 3] + [1] * 7, [0, 40, 3] + [2] * 7, [1, 1, 1] + [0] * 7])
    overrides = {"model-width": 0.25}

    def no_meta(limit: int) -> nn.Module:
        return _teacher_of(
            "mosaic-no-meta", states, counts, **{**overrides, "meta-prior-clients": limit}
        )

    full, same, bounded = no_meta(0)(x), no_meta(3), no_meta(2)
    two = _teacher_of("label-share", states[:2], counts[:2], **overrides)(x)

    torch.testing.assert_close(same(x), full)
    assert len(bounded.clients.members) == 2  # client 2 is nobody's largest holder
    torch.testing.assert_close(bounded(x).log_softmax(1), two.log_softmax(1))
    assert not torch.allclose(bounded(x).log_softmax(1), full.log_softmax(1))


def test_mosaic_global_features_teacher_reads_the_model_sent_this_round() -> None:
    """``meta-features = global``: the trained meta model's teacher runs the experts' heads on
    the body of the global model sent in the kd-round (the prototypes' feature space), and the
    prior it has to beat is scored read the same way."""
    torch.manual_seed(0)
    overrides = {
        "model-width": 0.25,
        "meta-epochs": 1,
        "meta-features": "global",
        "meta-feedforward": 32,
    }
    cfg = parse_run_config({**pyproject_defaults(), "strategy": "mosaic", **overrides})
    info = dataset_info(cfg.dataset)
    template = build_classifier(
        cfg.model, num_classes=info.num_classes, in_shape=info.image_shape, width=0.25
    )
    scored: list[nn.Module] = []
    mosaic = STRATEGIES["mosaic"](
        cfg,
        template,
        info,
        device=torch.device("cpu"),
        evaluate_model=lambda m: scored.append(m) or {"accuracy": 0.5},
    )
    states = [template.state_dict(), {k: v + 0.01 for k, v in template.state_dict().items()}]
    counts = np.array([[30, 0] + [3] * 8, [0, 30] + [3] * 8])
    features = torch.randn(40, template.feature_dim)
    mosaic.bank.add(cfg.kd_round, features, torch.arange(40) % info.num_classes)
    with pytest.raises(RuntimeError, match="sent this round"):
        mosaic.build_teacher(ClientModels(states, counts))

    sent = build_classifier(
        cfg.model, num_classes=info.num_classes, in_shape=info.image_shape, width=0.25
    )
    mosaic.sent_arrays = state_to_record(sent.state_dict())
    teacher, figures = mosaic.build_teacher(ClientModels(states, counts))

    assert "meta-val-accuracy" in figures and teacher.body is not None
    for key, tensor in sent.state_dict().items():
        assert torch.equal(teacher.body.state_dict()[key], tensor), key
    assert teacher.meta.transformer.encoder.layers[0].linear1.out_features == 32
    assert figures["prior-accuracy"] == 0.5
    (prior_read,) = scored
    x = torch.randn(4, *info.image_shape)
    with torch.no_grad():
        expected = teacher.prior.heads(sent.eval().features(x))
        torch.testing.assert_close(prior_read(x), expected)
        assert not torch.allclose(prior_read(x), teacher.prior(x))
