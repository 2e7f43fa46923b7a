"""Meta model: starts as the log-softmax ensemble, learns a combination, stops early."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.config import MetaTraining
from common.models import build_classifier
from server_app.meta import MetaModel, MosaicTeacher, train_meta_model
from server_app.moe import ExpertEnsemble, ProbabilityMixture, build_experts, label_share_weights
from tests.devices import DEVICES


def _one_reliable_expert(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """3 experts x 4 classes: expert 1 is right but timid, experts 0 and 2 are confident and
    random. The plain ensemble follows the loud experts; only learning which expert to trust
    recovers the class."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 4, (n,), generator=generator)
    noise = torch.randn(n, 3, 4, generator=generator)
    logits = 0.3 * noise
    logits[:, 1] += 1.5 * F.one_hot(targets, 4)
    for loud in (0, 2):
        logits[:, loud] += 6.0 * F.one_hot(torch.randint(0, 4, (n,), generator=generator), 4)
    return logits, targets


def test_untrained_meta_model_equals_mean_log_softmax_prior() -> None:
    meta = MetaModel(num_experts=3, num_classes=4).eval()
    logits = torch.randn(5, 3, 4)

    expected = F.log_softmax(logits, dim=-1).mean(dim=1)  # normalised to log-probabilities
    torch.testing.assert_close(meta(logits), F.log_softmax(expected, dim=-1))


def test_meta_model_without_prior_outputs_class_logits() -> None:
    meta = MetaModel(num_experts=3, num_classes=2, prior=False, d_model=4).eval()
    assert meta(torch.randn(4, 3, 2)).shape == (4, 2)
    with pytest.raises(ValueError):
        meta(torch.randn(4, 2, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_training_learns_which_expert_to_trust(device) -> None:
    inputs, targets = _one_reliable_expert(400)
    meta = MetaModel(3, 4, dim_feedforward=64)
    prior_accuracy = (meta.eval()(inputs).argmax(1) == targets).float().mean()
    assert prior_accuracy < 0.6

    result = train_meta_model(
        meta, inputs, targets, MetaTraining(epochs=40, lr=3e-3), device=device
    )

    assert result.val_accuracy >= 0.95
    assert result.train_accuracy >= 0.95
    assert not result.model.training


def test_early_stopping_ends_before_epochs_run_out() -> None:
    # Random labels: validation accuracy cannot keep improving.
    inputs = torch.randn(80, 3, 4)
    targets = torch.randint(0, 4, (80,))
    lines: list[str] = []

    result = train_meta_model(
        MetaModel(3, 4, dim_feedforward=64),
        inputs,
        targets,
        MetaTraining(epochs=200, patience=3),
        device="cpu",
        progress=lines.append,
    )

    assert result.epochs_run < 200
    assert len(result.history) == result.epochs_run == len(lines)
    # The best epoch is kept, not the last one.
    assert result.val_accuracy >= max(h["val_accuracy"] for h in result.history) - 1e-6


def test_tiny_bank_trains_on_everything() -> None:
    inputs, targets = _one_reliable_expert(4)
    targets = torch.arange(4)  # one prototype per class: nothing can be held out

    result = train_meta_model(
        MetaModel(3, 4, dim_feedforward=64), inputs, targets, MetaTraining(epochs=2), device="cpu"
    )

    assert result.epochs_run == 2
    assert 0.0 <= result.val_accuracy <= 1.0


def test_ema_option_runs_and_returns_averaged_weights() -> None:
    inputs, targets = _one_reliable_expert(200)
    result = train_meta_model(
        MetaModel(3, 4, dim_feedforward=64),
        inputs,
        targets,
        MetaTraining(epochs=60, lr=3e-3, ema_decay=0.9, patience=60),
        device="cpu",
    )
    assert result.epochs_run == 60
    assert result.val_accuracy >= 0.9


def test_teacher_is_meta_over_ensemble_and_stays_in_eval() -> None:
    model = build_classifier("cnn", num_classes=4, in_shape=(1, 8, 8), width=0.25).eval()
    experts = build_experts([model.state_dict()], np.array([[1, 2, 0, 3]]))
    ensemble = ExpertEnsemble(model, experts)
    meta = MetaModel(num_experts=3, num_classes=4)
    teacher = MosaicTeacher(ensemble, meta)
    x = torch.randn(2, 1, 8, 8)

    teacher.train()

    assert not teacher.training and not meta.training
    torch.testing.assert_close(teacher(x), meta(ensemble(x)))


def test_untrained_meta_model_is_the_given_prior() -> None:
    meta = MetaModel(num_experts=3, num_classes=4).eval()
    logits, prior = torch.randn(5, 3, 4), torch.randn(5, 4)

    torch.testing.assert_close(meta(logits, prior), F.log_softmax(prior, dim=-1))
    with pytest.raises(ValueError, match="prior"):
        meta(logits, torch.randn(5, 3))
    with pytest.raises(ValueError, match="without a prior"):
        MetaModel(3, 4, prior=False)(logits, prior)


def test_the_gate_reads_the_prior_token() -> None:
    """Experts are noise and the prior is always one class off: only reading the prior as an
    input (not just adding it) lets the meta model correct it."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 4, (400,), generator=generator)
    inputs = torch.randn(400, 3, 4, generator=generator)
    prior = 4.0 * F.one_hot((targets + 1) % 4, 4).float()
    meta = MetaModel(3, 4, dim_feedforward=64)
    assert (meta.eval()(inputs, prior).argmax(1) == targets).float().mean() == 0.0

    result = train_meta_model(
        meta,
        inputs,
        targets,
        MetaTraining(epochs=60, lr=3e-3, patience=60),
        priors=prior,
        device="cpu",
    )

    assert result.val_accuracy >= 0.95


def _experts_and_prior() -> tuple[ExpertEnsemble, ProbabilityMixture]:
    """Three experts and the label-share prior of two small client models (4 classes)."""
    model = build_classifier("cnn", num_classes=4, in_shape=(1, 8, 8), width=0.25).eval()
    counts = np.array([[1, 2, 0, 3], [4, 0, 0, 1]])
    states = [model.state_dict(), {k: v + 0.1 for k, v in model.state_dict().items()}]
    ensemble = ExpertEnsemble(model, build_experts(states, counts))
    prior = ProbabilityMixture(
        ExpertEnsemble(model, dict(enumerate(states))), label_share_weights(counts)
    )
    return ensemble, prior


def test_teacher_adds_the_label_share_prior_of_the_client_models() -> None:
    ensemble, prior = _experts_and_prior()
    meta = MetaModel(num_experts=3, num_classes=4)
    x = torch.randn(2, 1, 8, 8)

    teacher = MosaicTeacher(ensemble, meta, prior)

    torch.testing.assert_close(teacher(x), meta(ensemble(x), prior(x)))
    torch.testing.assert_close(teacher(x), prior(x).log_softmax(1))  # untrained: the prior
    with pytest.raises(ValueError, match="without one"):
        MosaicTeacher(ensemble, MetaModel(3, 4, prior=False), prior)


def test_teacher_on_a_global_body_reads_heads_on_its_features_as_on_prototypes() -> None:
    """``meta-features = global``: on an image, experts and prior apply only their heads to the
    global model's features, exactly as the meta model saw prototypes (features) in training."""
    torch.manual_seed(0)
    ensemble, prior = _experts_and_prior()
    meta = MetaModel(num_experts=3, num_classes=4, dim_feedforward=16)
    torch.nn.init.normal_(meta.out.weight)  # a trained meta model: not just its prior
    body = build_classifier("cnn", num_classes=4, in_shape=(1, 8, 8), width=0.25)
    x = torch.randn(2, 1, 8, 8)

    teacher = MosaicTeacher(ensemble, meta, prior, body=body)
    teacher.train()

    assert not body.training and not any(p.requires_grad for p in body.parameters())
    features = body.features(x)
    expected = meta(ensemble.heads(features), prior.heads(features))
    torch.testing.assert_close(teacher(x), expected)
    assert not torch.allclose(teacher(x), MosaicTeacher(ensemble, meta, prior)(x))
