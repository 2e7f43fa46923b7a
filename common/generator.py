"""Client-side generator training: a DCGAN steered by the client's own frozen classifier.

Each client trains one generator that imitates its data and uploads it once; the server later
draws distillation samples from it. The generator loss is (docs/method.md, "Generator (client
side)")

    lambda_adv * L_adv + lambda_div * L_div + lambda_ent * L_ent + lambda_inv * L_inv

with the discriminator keeping samples realistic, L_div spreading them over the classes the
client holds, L_ent making each one confidently classified and L_inv matching the classifier's
BatchNorm statistics (DeepInversion), which helps clients with little data. Every model sees
generator output only after ``to_input`` has mapped it from [-1, 1] into the classifier's
normalised input space.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.config import GeneratorTraining
from common.models import (
    Classifier,
    Generator,
    GeneratorSpec,
    build_discriminator,
    build_generator,
    fused_for_inference,
)

_EPS = 1e-8  # floor for probabilities inside a log: x log x -> 0 as x -> 0, never NaN


def adversarial_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss: BCE of the discriminator's logits against "real".

    Maximising log D(G(z)) instead of minimising log(1 - D(G(z))) keeps gradients alive while
    the discriminator still wins easily, early in training.
    """
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def diversity_loss(probs: Tensor, class_prior: Tensor | None = None) -> Tensor:
    """Penalise a batch whose mean prediction ``pbar`` (over ``probs`` [B, C]) is skewed.

    Without a prior this is ``sum_c pbar_c log pbar_c`` (the released code's L_div), minimal
    (-log C) at a uniform marginal, so it spreads samples over all C classes. With a prior ``q``
    (the client's label distribution, no zeros) it is ``KL(pbar || q)``, minimal (0) at
    ``pbar = q``: samples cover the classes the client actually holds, in its proportions,
    instead of hallucinating classes it has never seen. For uniform ``q`` the two differ only
    by the constant ``log C``.
    """
    pbar = probs.mean(0)
    neg_entropy = (pbar * pbar.clamp_min(_EPS).log()).sum()
    if class_prior is None:
        return neg_entropy
    return neg_entropy - (pbar * class_prior.clamp_min(_EPS).log()).sum()


def entropy_loss(probs: Tensor) -> Tensor:
    """Mean per-sample entropy of ``probs`` [B, C]; minimising it gives confident samples."""
    return -(probs * probs.clamp_min(_EPS).log()).sum(1).mean()


def class_prior_from_counts(label_counts: Sequence[int], smoothing: float = 1.0) -> Tensor:
    """The client's label distribution with add-``smoothing`` counts, so no class has mass 0.

    A zero would make ``KL(pbar || q)`` infinite for any sample of an unseen class; with one
    pseudo-count such samples are merely expensive (log q is about -log N).
    """
    counts = torch.as_tensor(label_counts, dtype=torch.float32) + smoothing
    return counts / counts.sum()


class BatchNormInversionLoss:
    """DeepInversion's feature-statistics term for every BatchNorm2d of a model.

    Used as a context manager: hooks are registered on entry and removed on exit. After each
    forward pass :meth:`value` is ``sum_layers ||mu_batch - running_mean||_2 +
    ||var_batch - running_var||_2``, where the batch statistics are those of the layer's input
    (biased variance, as BatchNorm normalises with). The model should be in eval mode so that
    its running statistics stay what the client's data made them.

    A pass under ``torch.no_grad`` records nothing (and forgets the previous pass): the term is
    a loss for the inputs, useless without their gradient, and the batch variance is the
    costliest part of a forward pass here (DENSE's student step runs the client models without
    gradients every iteration; computing the term there took about a sixth of a step).
    """

    def __init__(self, model: nn.Module) -> None:
        self._layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._terms: dict[int, Tensor] = {}

    def __enter__(self) -> BatchNormInversionLoss:
        for index, layer in enumerate(self._layers):
            self._handles.append(layer.register_forward_hook(self._hook(index)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._terms.clear()

    def _hook(self, index: int) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def record(layer: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
            if not torch.is_grad_enabled():
                self._terms.clear()
                return
            x = inputs[0]
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            self._terms[index] = torch.linalg.vector_norm(
                mean - layer.running_mean
            ) + torch.linalg.vector_norm(var - layer.running_var)

        return record

    @property
    def ran(self) -> bool:
        """Whether a BatchNorm2d layer recorded a term in the latest pass with gradients (an MLP,
        or a zoo member that did not run, has none)."""
        return bool(self._terms)

    def value(self) -> Tensor:
        """The term for the latest forward pass (each layer's entry is overwritten per pass)."""
        if not self._terms:
            raise RuntimeError(
                "no BatchNorm2d layer has run with gradients enabled since this context was"
                " entered or since the last pass under torch.no_grad"
            )
        return torch.stack(list(self._terms.values())).sum()


@dataclass(frozen=True)
class GeneratorLossWeights:
    """The lambdas of the generator loss; a term whose weight is 0 is not computed at all."""

    adv: float = 1.0
    div: float = 5.0
    ent: float = 0.0
    inv: float = 0.0


def generator_loss(
    fake_inputs: Tensor,
    *,
    classifier: nn.Module,
    discriminator: nn.Module,
    weights: GeneratorLossWeights,
    class_prior: Tensor | None = None,
    inversion: BatchNormInversionLoss | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted generator loss on ``fake_inputs`` (generator output in classifier space).

    Returns the total and the detached value of each computed term. ``inversion`` must be an
    entered :class:`BatchNormInversionLoss` on ``classifier`` when ``weights.inv`` is nonzero.
    """
    total = fake_inputs.new_zeros(())
    terms: dict[str, Tensor] = {}

    def add(name: str, weight: float, term: Tensor) -> None:
        nonlocal total
        total = total + weight * term
        terms[name] = term.detach()

    if weights.adv:
        add("adv", weights.adv, adversarial_loss(discriminator(fake_inputs)))
    if weights.div or weights.ent or weights.inv:
        probs = classifier(fake_inputs).softmax(1)
        if weights.div:
            add("div", weights.div, diversity_loss(probs, class_prior))
        if weights.ent:
            add("ent", weights.ent, entropy_loss(probs))
        if weights.inv:
            if inversion is None:
                raise ValueError("weights.inv is nonzero but no BatchNormInversionLoss was given")
            add("inv", weights.inv, inversion.value())
    return total, terms


@dataclass
class GeneratorTrainResult:
    """A trained generator (eval mode, on CPU, ready to upload) and how training went."""

    generator: Generator
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients inside; every module's flags restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for param, requires_grad in grads:
            param.requires_grad_(requires_grad)


def _minibatch_indices(n: int, batch_size: int, rng: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled epochs over ``range(n)``, cut into batches of ``min(batch_size, n)``."""
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=rng)
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]


def train_generator(
    classifier: Classifier,
    images: Tensor,
    settings: GeneratorTraining,
    *,
    spec: GeneratorSpec,
    to_input: Callable[[Tensor], Tensor],
    label_counts: Sequence[int] | None,
    device: torch.device | str,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    log_every: int = 50,
) -> GeneratorTrainResult:
    """Train a client's generator against a fresh discriminator and its frozen classifier.

    Parameters
    ----------
    classifier
        The client's trained model. It stays in eval mode with frozen parameters throughout (so
        its BatchNorm statistics are not polluted by fakes) and is handed back as it came.
    images
        The client's training images [N, C, H, W], already normalised (classifier space).
    to_input
        Maps generator output in [-1, 1] into classifier space; applied to every fake before
        the discriminator or the classifier sees it.
    label_counts
        Images per class at the client; when given, the diversity term is ``KL(pbar || q)``
        with ``q`` the smoothed label distribution, otherwise the plain form over all classes.
    settings
        Sizes and loss weights; ``settings.steps`` optimiser steps, each one discriminator
        update and one generator update.

    Returns
    -------
    GeneratorTrainResult
        The generator in eval mode on CPU, window means of every loss term every
        ``log_every`` steps (and at the last step), and the wall time.
    """
    steps, batch_size = settings.steps, settings.batch_size
    if len(images) == 0:
        raise ValueError("cannot train a generator without images")
    if batch_size < 2:  # the generator's BatchNorm needs two samples to normalise over
        raise ValueError(f"batch_size must be at least 2, got {batch_size}")
    num_classes = classifier.head.out_features
    if label_counts is not None and len(label_counts) != num_classes:
        raise ValueError(f"{len(label_counts)} label counts for {num_classes} classes")
    started = time.perf_counter()
    weights = GeneratorLossWeights(
        settings.lambda_adv, settings.lambda_div, settings.lambda_ent, settings.lambda_inv
    )
    class_prior = None if label_counts is None else class_prior_from_counts(label_counts)
    if class_prior is not None:
        class_prior = class_prior.to(device)

    rng = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG alone
        torch.manual_seed(seed)
        generator = build_generator(spec).to(device)
        discriminator = build_discriminator(spec.image_shape, spec.base_channels).to(device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=settings.lr, betas=settings.betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=settings.lr, betas=settings.betas)
    batches = _minibatch_indices(len(images), batch_size, rng)
    classifier_device = next(classifier.parameters()).device
    history: list[dict[str, float]] = []
    window: dict[str, Tensor] = {}
    window_start = 0

    classifier.to(device)
    inversion = BatchNormInversionLoss(classifier) if settings.lambda_inv else None
    try:
        with frozen(classifier), inversion or nullcontext():
            # The same function without BatchNorm passes (docs/speed.md); the inversion term
            # reads the BatchNorm layers themselves, so it keeps the model as it is.
            scorer = classifier if inversion else fused_for_inference(classifier)
            for step in range(steps):
                real = images[next(batches)].to(device, non_blocking=True)
                z = torch.randn(batch_size, spec.latent_dim, generator=rng).to(device)
                fake = to_input(generator(z))

                # Discriminator: real vs. (detached) fake, both in classifier space.
                real_logits = discriminator(real)
                fake_logits = discriminator(fake.detach())
                d_loss = F.binary_cross_entropy_with_logits(
                    real_logits, torch.ones_like(real_logits)
                ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()

                # Generator: the same fakes against the updated discriminator and the classifier.
                discriminator.requires_grad_(False)
                g_loss, terms = generator_loss(
                    fake,
                    classifier=scorer,
                    discriminator=discriminator,
                    weights=weights,
                    class_prior=class_prior,
                    inversion=inversion,
                )
                discriminator.requires_grad_(True)
                opt_g.zero_grad(set_to_none=True)
                g_loss.backward()
                opt_g.step()

                for name, value in {"d": d_loss.detach(), "g": g_loss.detach(), **terms}.items():
                    window[name] = window.get(name, 0.0) + value
                if (step + 1) % log_every == 0 or step + 1 == steps:
                    count = step + 1 - window_start
                    record = {"step": float(step + 1)}
                    record.update({k: float(v) / count for k, v in window.items()})
                    history.append(record)
                    window, window_start = {}, step + 1
                    if progress is not None:
                        losses = " ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "step")
                        progress(f"generator step {step + 1}/{steps}: {losses}")
    finally:
        classifier.to(classifier_device)

    generator.eval().cpu()
    return GeneratorTrainResult(generator, history, time.perf_counter() - started)
