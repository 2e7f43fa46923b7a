"""Plain-PyTorch training pieces a client (and the server's evaluation) runs.

Nothing here knows about Flower: the apps translate messages into these calls.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.config import LocalTraining
from common.models import Classifier


def resolve_device(name: str) -> torch.device:
    """Map the config's ``device`` ("auto", "cpu", "cuda", "cuda:1", "mps") to a torch device.

    "auto" picks CUDA when present, else CPU; this is the only place that decides.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        # Ray gives each ClientApp only the GPUs it reserved for it, renumbered from 0
        raise RuntimeError(
            f"device {name!r}: this process sees {torch.cuda.device_count()} GPU(s), numbered "
            "from 0 (CUDA_VISIBLE_DEVICES, which Ray sets per ClientApp); use 'cuda' or 'auto'"
        )
    return device


def inference_batch_size(device: torch.device | str) -> int:
    """Samples per forward pass when a model only infers (evaluation, prototypes' features).

    On a CPU small batches win: a batch of 1,024 28x28 images carries ~100 MB of activations
    through the first conv block, far past the caches, and the feature pass over 6,000 images
    took 0.98 s against 0.36 s in batches of 128 (the outputs bit for bit the same). An
    accelerator wants few, large launches.
    """
    return 128 if torch.device(device).type == "cpu" else 1024


@dataclass(frozen=True)
class LocalTrainResult:
    """What local training reports: the mean loss over its steps and how many samples it saw."""

    mean_loss: float
    samples_seen: int


def squared_distance(parameters: Iterable[Tensor], anchor: Iterable[Tensor]) -> Tensor:
    """``||w - w_0||^2`` summed over parameter tensors: the proximal term of FedProx's local
    training and of the server's pulled distillation (``kd-proximal-mu``)."""
    return sum((p - a).pow(2).sum() for p, a in zip(parameters, anchor, strict=True))


def crop_and_flip(images: Tensor, rng: torch.Generator, padding: int = 4) -> Tensor:
    """Each image of ``[B, C, H, W]`` padded by ``padding`` pixels (reflected), cropped back
    to ``H x W`` at a random offset and mirrored left-right with probability 1/2: the usual
    CIFAR augmentation, one draw per sample from ``rng`` (a CPU generator, so a seed gives
    the same batches on every device)."""
    batch, _, height, width = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=rng).to(images.device)
    flips = (torch.rand(batch, generator=rng) < 0.5).to(images.device)
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    rows = offsets[0][:, None] + torch.arange(height, device=images.device)  # [B, H]
    columns = offsets[1][:, None] + torch.arange(width, device=images.device)  # [B, W]
    columns = torch.where(flips[:, None], columns.flip(1), columns)
    samples = torch.arange(batch, device=images.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[samples, rows[:, :, None], columns[:, None, :]]
    return cropped.permute(0, 3, 1, 2).contiguous()


def train_local(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: LocalTraining,
    *,
    device: torch.device,
    seed: int = 0,
) -> LocalTrainResult:
    """Run ``settings.steps`` SGD steps on random minibatches (the reference protocol counts
    steps).

    With ``settings.proximal_mu > 0`` the FedProx term mu/2 * ||w - w_global||^2 is added,
    where w_global is the model as it was on entry.
    """
    steps, proximal_mu = settings.steps, settings.proximal_mu
    model.to(device).train()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    rng = torch.Generator().manual_seed(seed)
    total_loss = 0.0
    batch = min(settings.batch_size, len(labels))
    for _ in range(steps):
        index = torch.randint(len(labels), (batch,), generator=rng)
        x, y = images[index].to(device), labels[index].to(device)
        if settings.augment == "crop-flip":
            x = crop_and_flip(x, rng)
        loss = F.cross_entropy(model(x), y)
        if anchor is not None:
            loss = loss + 0.5 * proximal_mu * squared_distance(model.parameters(), anchor)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item()
    return LocalTrainResult(mean_loss=total_loss / steps, samples_seen=steps * batch)


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int | None = None
) -> torch.Tensor:
    """Logits of ``model`` (eval mode) for all ``images``, returned on the CPU, in batches of
    ``batch_size`` (default :func:`inference_batch_size`)."""
    batch_size = batch_size or inference_batch_size(device)
    model.to(device).eval()
    return torch.cat(
        [
            model(images[i : i + batch_size].to(device)).cpu()
            for i in range(0, len(images), batch_size)
        ]
    )


@dataclass(frozen=True)
class EvalResult:
    """Accuracy and mean cross-entropy on a labelled set."""

    accuracy: float
    loss: float
    num_examples: int


def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor) -> EvalResult:
    """Score precomputed logits (lets teachers and students share one scoring path)."""
    return EvalResult(
        accuracy=(logits.argmax(1) == labels).float().mean().item(),
        loss=F.cross_entropy(logits, labels).item(),
        num_examples=len(labels),
    )


def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> EvalResult:
    """Accuracy and loss of ``model`` on a labelled set."""
    return evaluate_logits(predict_logits(model, images, device), labels)


def kmeans(points: torch.Tensor, k: int, *, iterations: int = 25, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; returns the assignment of each point.

    Small and exact enough for the few hundred feature vectors a client has per class.
    """
    rng = torch.Generator().manual_seed(seed)
    centres = points[torch.randint(len(points), (1,), generator=rng)]
    for _ in range(1, k):
        distance = torch.cdist(points, centres).min(1).values.pow(2)
        weights = distance / distance.sum() if distance.sum() > 0 else None
        if weights is None:
            choice = torch.randint(len(points), (1,), generator=rng)
        else:
            choice = torch.multinomial(weights, 1, generator=rng)
        centres = torch.cat([centres, points[choice]])
    assignment = torch.cdist(points, centres).argmin(1)
    for _ in range(iterations):
        for j in range(k):
            members = points[assignment == j]
            if len(members):
                centres[j] = members.mean(0)
        new_assignment = torch.cdist(points, centres).argmin(1)
        if torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
    return assignment


def _prototype_rows(labels: torch.Tensor, max_samples: int, seed: int) -> torch.Tensor | None:
    """The rows prototypes are computed from, in their original order: per class at most
    ``max_samples`` (a seeded draw); None when every row is kept."""
    if max_samples <= 0:
        return None
    rng = torch.Generator().manual_seed(seed)
    kept = []
    for cls in labels.unique().tolist():
        rows = (labels == cls).nonzero().flatten()
        if len(rows) > max_samples:
            rows = rows[torch.randperm(len(rows), generator=rng)[:max_samples]]
        kept.append(rows)
    if sum(len(rows) for rows in kept) == len(labels):
        return None
    return torch.cat(kept).sort().values


@dataclass(frozen=True)
class Prototypes:
    """Class prototypes: cluster centres in feature space, each with its class id."""

    features: torch.Tensor  # float32 [n, d]
    classes: torch.Tensor  # int64 [n]


@torch.no_grad()
def compute_prototypes(
    model: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    per_class: int,
    min_samples: int,
    device: torch.device,
    seed: int = 0,
    max_samples: int = 0,
) -> Prototypes:
    """Per class, up to ``per_class`` k-means centres of penultimate features.

    Privacy rule (docs/method.md): every centre summarises at least ``min_samples`` samples. A class
    gets k = min(per_class, n // min_samples) clusters; clusters that end up smaller than
    ``min_samples`` are merged away by dropping them (their points are not sent on their own),
    and a class with fewer than ``min_samples`` samples sends nothing.

    ``max_samples`` > 0 clusters a seeded random draw of at most that many samples per class:
    a few centres need a few hundred points, and the feature pass over every local sample can
    cost more than the round's training (conf/quick.toml: ~25,000 images against 5 steps).
    """
    keep = _prototype_rows(labels, max_samples, seed)
    if keep is not None:
        images, labels = images[keep], labels[keep]
    model.to(device).eval()
    batch = inference_batch_size(device)
    features = torch.cat([model.features(chunk.to(device)).cpu() for chunk in images.split(batch)])
    centres, classes = [], []
    for cls in labels.unique().tolist():
        points = features[labels == cls]
        k = min(per_class, len(points) // min_samples)
        if k == 0:
            continue
        assignment = (
            kmeans(points, k, seed=seed + cls)
            if k > 1
            else torch.zeros(len(points), dtype=torch.long)
        )
        for j in range(k):
            members = points[assignment == j]
            if len(members) >= min_samples:
                centres.append(members.mean(0))
                classes.append(cls)
    if not centres:
        return Prototypes(torch.empty(0, model.feature_dim), torch.empty(0, dtype=torch.long))
    return Prototypes(torch.stack(centres).float(), torch.tensor(classes, dtype=torch.long))
