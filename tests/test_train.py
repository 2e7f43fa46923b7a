"""Local training, FedProx, evaluation, k-means and the privacy rules of prototypes."""

import dataclasses

import pytest
import torch
from torch import nn

from common.config import LocalTraining
from common.models import Classifier, build_classifier
from common.train import (
    Prototypes,
    compute_prototypes,
    crop_and_flip,
    evaluate,
    evaluate_logits,
    kmeans,
    predict_logits,
    resolve_device,
    train_local,
)

CPU = torch.device("cpu")


class IdentityFeatures(Classifier):
    """A classifier whose features are its (flattened) input: prototypes become checkable."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.feature_dim = dim
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _toy_set(n: int = 120, num_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is the row of a bright band: learnable in a few steps."""
    labels = torch.arange(n) % num_classes
    images = 0.1 * torch.randn(n, 1, 8, 8)
    for cls in range(num_classes):
        images[labels == cls, :, 2 * cls : 2 * cls + 2, :] += 2.0
    return images, labels


def _toy_model(num_classes: int = 3) -> Classifier:
    return build_classifier("cnn", num_classes=num_classes, in_shape=(1, 8, 8), width=0.25)


def _train(model, images, labels, **overrides):
    kwargs = {
        "steps": 30,
        "batch_size": 16,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "device": CPU,
        **overrides,
    }
    settings, kwargs = _with_settings(LocalTraining, kwargs)
    return train_local(model, images, labels, settings, **kwargs)


# --- devices ---------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_auto_device_is_cpu_without_cuda() -> None:
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_asking_for_cuda_without_it_raises(name) -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device(name)


# --- local training --------------------------------------------------------------------------


def test_train_local_reduces_loss_on_a_learnable_set() -> None:
    images, labels = _toy_set()
    model = _toy_model()
    before = evaluate(model, images, labels, CPU)

    result = _train(model, images, labels)

    after = evaluate(model, images, labels, CPU)
    assert after.loss < before.loss
    assert after.accuracy >= 0.9
    assert result.samples_seen == 30 * 16
    assert result.mean_loss > 0


def test_train_local_is_reproducible_for_a_seed() -> None:
    images, labels = _toy_set()
    torch.manual_seed(1)
    first = _toy_model()
    second = build_classifier("cnn", num_classes=3, in_shape=(1, 8, 8), width=0.25)
    second.load_state_dict(first.state_dict())

    _train(first, images, labels, steps=5, seed=7)
    _train(second, images, labels, steps=5, seed=7)

    for key, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[key]), key


def test_crop_and_flip_gives_each_image_a_shifted_window_of_itself_maybe_mirrored() -> None:
    images = torch.arange(2 * 3 * 6 * 5, dtype=torch.float32).view(2, 3, 6, 5)
    out = crop_and_flip(images, torch.Generator().manual_seed(3), padding=2)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="reflect")
    for i in range(len(images)):
        crops = [padded[i, :, dy : dy + 6, dx : dx + 5] for dy in range(5) for dx in range(5)]
        windows = crops + [crop.flip(-1) for crop in crops]
        assert any(torch.equal(out[i], window) for window in windows), i
    again = crop_and_flip(images, torch.Generator().manual_seed(3), padding=2)
    assert torch.equal(out, again)  # one seed, one augmentation


def test_crop_and_flip_draws_every_offset_and_both_orientations() -> None:
    image = torch.arange(36, dtype=torch.float32).view(1, 1, 6, 6).repeat(400, 1, 1, 1)
    out = crop_and_flip(image, torch.Generator().manual_seed(0), padding=1)
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) == 3 * 3 * 2  # 9 offsets x mirrored or not


def test_train_local_with_augmentation_is_reproducible_and_trains_on_other_images() -> None:
    images, labels = _toy_set()
    models = [_toy_model() for _ in range(3)]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    _train(models[0], images, labels, augment="crop-flip", seed=4)
    _train(models[1], images, labels, augment="crop-flip", seed=4)
    _train(models[2], images, labels, seed=4)
    params = [list(model.parameters()) for model in models]
    assert all(torch.equal(a, b) for a, b in zip(params[0], params[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(params[0], params[2], strict=True))


def test_batch_larger_than_the_data_uses_all_of_it() -> None:
    images, labels = _toy_set(n=6)
    result = _train(_toy_model(), images, labels, steps=2, batch_size=64)
    assert result.samples_seen == 2 * 6


def _distance_travelled(proximal_mu: float) -> float:
    images, labels = _toy_set()
    torch.manual_seed(3)
    model = _toy_model()
    anchor = [p.detach().clone() for p in model.parameters()]
    _train(model, images, labels, steps=40, lr=0.1, proximal_mu=proximal_mu)
    return sum(
        (p.detach() - a).pow(2).sum().item()
        for p, a in zip(model.parameters(), anchor, strict=True)
    )


def test_fedprox_term_keeps_weights_closer_to_the_global_model() -> None:
    plain = _distance_travelled(0.0)
    proximal = _distance_travelled(5.0)
    assert proximal < 0.8 * plain


# --- evaluation ------------------------------------------------------------------------------


def test_evaluate_logits_scores_accuracy_and_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 0.5]])
    labels = torch.tensor([0, 1, 1, 0])

    result = evaluate_logits(logits, labels)

    assert result.accuracy == pytest.approx(0.5)  # rows 0 and 1 right, 2 and 3 wrong
    assert result.num_examples == 4
    expected = torch.nn.functional.cross_entropy(logits, labels).item()
    assert result.loss == pytest.approx(expected)
    assert evaluate_logits(torch.eye(3) * 10, torch.arange(3)).accuracy == 1.0


def test_predict_logits_in_batches_matches_one_pass() -> None:
    images, _ = _toy_set(n=10)
    model = _toy_model().eval()
    with torch.no_grad():
        whole = model(images)
    assert torch.allclose(predict_logits(model, images, CPU, batch_size=3), whole, atol=1e-6)


# --- k-means ---------------------------------------------------------------------------------


def _blobs(sizes: list[int], centres: torch.Tensor, spread: float = 0.05) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.cat(
        [
            centre + spread * torch.randn(size, centres.shape[1], generator=gen)
            for size, centre in zip(sizes, centres, strict=True)
        ]
    )


def test_kmeans_recovers_well_separated_blobs() -> None:
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    sizes = [20, 15, 25, 10]
    points = _blobs(sizes, centres)
    truth = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))

    assignment = kmeans(points, 4, seed=1)

    # The same partition up to relabelling: every blob maps to one cluster, all distinct.
    mapping = {int(t): set(assignment[truth == t].tolist()) for t in range(4)}
    assert all(len(clusters) == 1 for clusters in mapping.values())
    assert len(set.union(*mapping.values())) == 4


def test_kmeans_with_one_cluster_assigns_everything_to_it() -> None:
    points = torch.randn(12, 3)
    assert torch.equal(kmeans(points, 1), torch.zeros(12, dtype=torch.long))


def test_kmeans_survives_identical_points() -> None:
    assignment = kmeans(torch.ones(10, 4), 3)
    assert assignment.shape == (10,)
    assert int(assignment.min()) >= 0
    assert int(assignment.max()) < 3


# --- prototypes ------------------------------------------------------------------------------


def _prototypes(model, images, labels, per_class=3, min_samples=5):
    return compute_prototypes(
        model, images, labels, per_class=per_class, min_samples=min_samples, device=CPU
    )


def test_prototypes_respect_k_dimension_and_dtype() -> None:
    images, labels = _toy_set(n=90)
    model = _toy_model()
    _train(model, images, labels, steps=5)

    prototypes = _prototypes(model, images, labels, per_class=2, min_samples=5)

    assert prototypes.features.dtype == torch.float32
    assert prototypes.classes.dtype == torch.int64
    assert prototypes.features.shape == (len(prototypes.classes), model.feature_dim)
    assert torch.bincount(prototypes.classes).max() <= 2
    assert set(prototypes.classes.tolist()) == {0, 1, 2}


def test_every_centre_summarises_at_least_min_samples_points() -> None:
    """Class 0: blobs of 10, 10 and 2 points -> k = 3 clusters, the 2-point one is dropped."""
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = _blobs([10, 10, 2], centres)
    model = IdentityFeatures(dim=2, num_classes=2)

    prototypes = _prototypes(model, points, torch.zeros(22, dtype=torch.long), min_samples=5)

    assert prototypes.classes.tolist() == [0, 0]
    expected = torch.stack([points[:10].mean(0), points[10:20].mean(0)])
    found = sorted(prototypes.features.tolist())
    assert torch.allclose(torch.tensor(found), expected, atol=1e-5)


def test_class_with_fewer_than_min_samples_sends_nothing() -> None:
    points = torch.cat([torch.randn(12, 4), torch.randn(4, 4) + 5])
    labels = torch.tensor([0] * 12 + [1] * 4)
    model = IdentityFeatures(dim=4, num_classes=2)

    prototypes = _prototypes(model, points, labels, per_class=3, min_samples=5)

    assert 1 not in prototypes.classes.tolist()
    # 12 samples with min 5 -> at most 12 // 5 = 2 centres, each of at least 5 samples.
    assert 1 <= len(prototypes.classes) <= 2


def test_class_with_just_min_samples_sends_its_mean() -> None:
    points = torch.randn(5, 3)
    model = IdentityFeatures(dim=3, num_classes=1)

    prototypes = _prototypes(model, points, torch.zeros(5, dtype=torch.long), min_samples=5)

    assert prototypes.classes.tolist() == [0]
    assert torch.allclose(prototypes.features[0], points.mean(0))


class CountingFeatures(IdentityFeatures):
    """Identity features that remember every row they were asked for."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__(dim=dim, num_classes=num_classes)
        self.seen: list[torch.Tensor] = []

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return super().features(x)


def test_max_samples_featurises_a_seeded_draw_per_class_and_keeps_small_classes_whole() -> None:
    points = torch.arange(130, dtype=torch.float32).view(130, 1)  # a point's value is its row
    labels = torch.tensor([0] * 100 + [1] * 30)

    def run(max_samples: int, seed: int) -> tuple[list[float], Prototypes]:
        model = CountingFeatures(dim=1, num_classes=2)
        prototypes = compute_prototypes(
            model,
            points,
            labels,
            per_class=2,
            min_samples=5,
            device=CPU,
            seed=seed,
            max_samples=max_samples,
        )
        return torch.cat(model.seen).flatten().tolist(), prototypes

    rows, prototypes = run(40, seed=0)
    assert len(rows) == 40 + 30 and rows == sorted(rows)  # 40 of class 0, class 1 whole
    assert sum(r < 100 for r in rows) == 40 and set(range(100, 130)) <= set(rows)
    assert rows == run(40, seed=0)[0] and rows != run(40, seed=1)[0]
    assert sorted(prototypes.classes.tolist()) == [0, 0, 1, 1]
    assert run(0, seed=0)[0] == run(500, seed=0)[0] == points.flatten().tolist()


def test_no_class_large_enough_gives_empty_prototypes_of_the_right_width() -> None:
    model = IdentityFeatures(dim=3, num_classes=2)
    prototypes = _prototypes(model, torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), min_samples=3)
    assert prototypes.features.shape == (0, 3)
    assert prototypes.classes.shape == (0,)


def test_no_centre_is_a_single_samples_feature() -> None:
    """Privacy: with min_samples > 1 no per-sample feature vector leaves the client."""
    images, labels = _toy_set(n=90)
    model = _toy_model()
    _train(model, images, labels, steps=5)
    with torch.no_grad():
        features = model.eval().features(images)

    prototypes = _prototypes(model, images, labels, per_class=5, min_samples=3)

    assert len(prototypes.classes) > 0
    distances = torch.cdist(prototypes.features, features)
    assert distances.min() > 1e-4


def _with_settings(view, options: dict) -> tuple:
    """``options`` split into the ``view`` dataclass (its fields) and the other keywords."""
    names = {f.name for f in dataclasses.fields(view)}
    settings = view(**{k: v for k, v in options.items() if k in names})
    return settings, {k: v for k, v in options.items() if k not in names}
