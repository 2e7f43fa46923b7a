"""Tests for the client generator: each loss term alone, then the training loop end to end."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.config import GeneratorTraining
from common.generator import (
    BatchNormInversionLoss,
    GeneratorLossWeights,
    adversarial_loss,
    class_prior_from_counts,
    diversity_loss,
    entropy_loss,
    generator_loss,
    train_generator,
)
from common.models import (
    GeneratorSpec,
    build_classifier,
    build_discriminator,
    build_generator,
    fused_for_inference,
)

SHAPE = (1, 8, 8)
SPEC = GeneratorSpec(latent_dim=8, image_shape=SHAPE, base_channels=4)


def to_input(x: torch.Tensor) -> torch.Tensor:
    """Stand-in for the dataset normalisation: [-1, 1] -> roughly zero mean, unit std."""
    return (x * 0.5 + 0.5 - 0.3) / 0.3


@pytest.fixture
def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 8x8 images: bright top half vs. bright bottom half, plus noise."""
    labels = torch.arange(64) % 2
    images = torch.randn(64, *SHAPE) * 0.3
    images[labels == 0, :, :4] += 1.5
    images[labels == 1, :, 4:] += 1.5
    return images, labels


@pytest.fixture
def classifier(toy_data: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    images, labels = toy_data
    model = build_classifier("cnn", num_classes=2, in_shape=SHAPE, width=0.25)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model.eval()


def test_adversarial_loss_is_bce_against_real() -> None:
    logits = torch.tensor([0.0, 2.0])
    expected = (math.log(2) + math.log(1 + math.exp(-2))) / 2
    assert adversarial_loss(logits).item() == pytest.approx(expected)


def test_diversity_loss_without_prior_is_minus_log_c_at_uniform_marginal() -> None:
    probs = torch.eye(4)  # each sample one-hot, the batch marginal uniform
    assert diversity_loss(probs).item() == pytest.approx(-math.log(4))


def test_diversity_loss_is_zero_for_one_hot_marginal() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert diversity_loss(probs).item() == pytest.approx(0.0, abs=1e-6)


def test_diversity_loss_with_prior_is_kl_of_marginal_to_prior() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.4, 0.3]])
    prior = torch.tensor([0.5, 0.25, 0.25])
    pbar = probs.mean(0)
    kl = (pbar * (pbar / prior).log()).sum().item()
    assert diversity_loss(probs, prior).item() == pytest.approx(kl, rel=1e-5)
    uniform = torch.full((3,), 1 / 3)
    assert diversity_loss(probs, uniform).item() == pytest.approx(
        diversity_loss(probs).item() + math.log(3)
    )


def test_class_prior_from_counts_has_no_zero() -> None:
    prior = class_prior_from_counts([3, 0, 1])
    assert torch.allclose(prior, torch.tensor([4.0, 1.0, 2.0]) / 7)


def test_entropy_loss_is_zero_for_one_hot_and_log_c_for_uniform() -> None:
    assert entropy_loss(torch.eye(5)).item() == pytest.approx(0.0, abs=1e-6)
    assert entropy_loss(torch.full((3, 5), 0.2)).item() == pytest.approx(math.log(5))


def test_inversion_loss_is_zero_at_running_stats_positive_otherwise_and_unhooks() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3))
    model.eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():  # in order, give each layer the statistics of its input on this batch
        for index in (1, 3):
            h = model[:index](x)
            model[index].running_mean.copy_(h.mean((0, 2, 3)))
            model[index].running_var.copy_(h.var((0, 2, 3), unbiased=False))
    with BatchNormInversionLoss(model) as inversion:
        model(x)
        assert inversion.value().item() == pytest.approx(0.0, abs=1e-5)
        model(x * 2 + 1)
        assert inversion.value().item() > 0.1
    assert all(not bn._forward_hooks for bn in (model[1], model[3]))


def test_inversion_loss_records_nothing_without_gradients() -> None:
    """A pass under no_grad neither computes the term nor leaves the previous one behind."""
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)).eval()
    x = torch.randn(8, 1, 8, 8)
    with BatchNormInversionLoss(model) as inversion:
        model(x)
        with_grad = inversion.value()
        assert with_grad.item() > 0
        with torch.no_grad():
            model(x * 3)
        with pytest.raises(RuntimeError, match="no_grad"):
            inversion.value()
        model(x)
        assert inversion.value().item() == pytest.approx(with_grad.item())


@pytest.mark.parametrize("term", ["adv", "div", "ent", "inv"])
def test_each_term_alone_sends_gradient_to_the_generator(term: str, classifier: nn.Module) -> None:
    generator = build_generator(SPEC)
    discriminator = build_discriminator(SHAPE, SPEC.base_channels)
    weights = GeneratorLossWeights(
        **{name: float(name == term) for name in ["adv", "div", "ent", "inv"]}
    )
    with BatchNormInversionLoss(classifier) as inversion:
        total, terms = generator_loss(
            to_input(generator.sample(16)),
            classifier=classifier,
            discriminator=discriminator,
            weights=weights,
            class_prior=class_prior_from_counts([5, 1]),
            inversion=inversion,
        )
    assert set(terms) == {term}
    total.backward()
    grad_norm = sum(p.grad.norm() for p in generator.parameters() if p.grad is not None)
    assert grad_norm > 0


def test_zero_weights_remove_every_term(classifier: nn.Module) -> None:
    generator = build_generator(SPEC)
    total, terms = generator_loss(
        to_input(generator.sample(16)),
        classifier=classifier,
        discriminator=build_discriminator(SHAPE, SPEC.base_channels),
        weights=GeneratorLossWeights(adv=0.0, div=0.0, ent=0.0, inv=0.0),
    )
    assert terms == {}
    assert total.item() == 0.0 and not total.requires_grad


def test_total_is_the_weighted_sum_of_the_terms(classifier: nn.Module) -> None:
    weights = GeneratorLossWeights(adv=1.0, div=5.0, ent=0.5, inv=0.1)
    with BatchNormInversionLoss(classifier) as inversion:
        total, terms = generator_loss(
            to_input(build_generator(SPEC).sample(16)),
            classifier=classifier,
            discriminator=build_discriminator(SHAPE, SPEC.base_channels),
            weights=weights,
            inversion=inversion,
        )
    expected = sum(getattr(weights, name) * value for name, value in terms.items())
    assert set(terms) == {"adv", "div", "ent", "inv"}
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def run_training(classifier: nn.Module, images: torch.Tensor, **overrides: object):
    options = dict(
        spec=SPEC,
        to_input=to_input,
        label_counts=[32, 32],
        steps=30,
        batch_size=16,
        lambda_ent=0.1,
        lambda_inv=0.1,
        device="cpu",
        log_every=10,
    )
    settings, options = _with_settings(GeneratorTraining, {**options, **overrides})
    return train_generator(classifier, images, settings, **options)


def test_train_generator_leaves_the_classifier_untouched(classifier: nn.Module, toy_data) -> None:
    classifier.train()  # the caller's mode must come back, whatever it was
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    run_training(classifier, toy_data[0])
    after = classifier.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert classifier.training
    assert all(p.requires_grad for p in classifier.parameters())
    assert all(not m._forward_hooks for m in classifier.modules())


def test_train_generator_returns_an_eval_generator_of_bounded_samples(
    classifier: nn.Module, toy_data
) -> None:
    lines: list[str] = []
    result = run_training(classifier, toy_data[0], progress=lines.append)
    assert not result.generator.training
    samples = result.generator.sample(10)
    assert samples.shape == (10, *SHAPE)
    assert samples.min() >= -1 and samples.max() <= 1
    assert [record["step"] for record in result.history] == [10, 20, 30]
    assert set(result.history[0]) == {"step", "d", "g", "adv", "div", "ent", "inv"}
    assert len(lines) == 3 and result.seconds > 0


def test_train_generator_is_reproducible_for_a_seed(classifier: nn.Module, toy_data) -> None:
    first, second, other = (
        run_training(classifier, toy_data[0], steps=5, seed=seed).generator.state_dict()
        for seed in (3, 3, 4)
    )
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_train_generator_rejects_label_counts_of_the_wrong_length(
    classifier: nn.Module, toy_data
) -> None:
    with pytest.raises(ValueError, match="label counts"):
        run_training(classifier, toy_data[0], label_counts=[1, 2, 3])


def _with_settings(view, options: dict) -> tuple:
    """``options`` split into the ``view`` dataclass (its fields) and the other keywords."""
    names = {f.name for f in dataclasses.fields(view)}
    settings = view(**{k: v for k, v in options.items() if k in names})
    return settings, {k: v for k, v in options.items() if k not in names}


@pytest.mark.parametrize("name", ["cnn", "resnet8", "mlp"])
def test_the_fused_classifier_is_the_same_function_and_gradient(name: str) -> None:
    """The generator's classifier pass runs a copy with each conv-BN pair folded into one
    convolution: logits and the input gradient (all a generator step takes from it) are the
    eval-mode model's, and the model itself is left as it was."""
    torch.manual_seed(0)
    model = build_classifier(name, num_classes=4, in_shape=SHAPE).eval()
    for module in model.modules():  # statistics and affine far from identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.2, 3.0)
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fused_for_inference(model)

    x = torch.randn(16, *SHAPE, requires_grad=True)
    model(x).softmax(1)[:, 0].sum().backward()
    expected_grad, x.grad = x.grad, None
    fused(x).softmax(1)[:, 0].sum().backward()

    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)
    assert torch.allclose(x.grad, expected_grad, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not fused.training
    if name == "cnn":  # its convs and BatchNorms sit in one Sequential: all fused
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
