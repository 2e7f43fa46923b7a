"""Data-free distillation of the Mosaic teacher into the global model on generator samples."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from common.config import Distillation
from common.models import Generator
from common.train import squared_distance


def jensen_shannon(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row Jensen-Shannon divergence (natural log, in ``[0, ln 2]``) of two distributions
    given as log-probabilities ``[B, C]``.

    ``0.5 KL(p || m) + 0.5 KL(q || m)`` with ``m = (p + q) / 2``, formed in log space
    (``logaddexp``) so that vanishing probabilities give neither NaN nor infinity.
    """
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1)
    kl_qm = F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.8,
    beta: float = 1.0,
    temperature: float = 1.0,
    sample_weights: Tensor | None = None,
) -> Tensor:
    """``alpha T^2 KL(p || q) + (1 - alpha) CE(s, argmax t) + beta JS(p, q)``, averaged.

    ``p = softmax(t / T)`` is the teacher, ``q = softmax(s / T)`` the student. The hard-label
    term matters: when the teacher's soft output is nearly flat (as an ensemble's often is),
    KL and JS barely pull, while the cross-entropy to the teacher's argmax still does. JS is the
    true divergence of the two distributions (:func:`jensen_shannon`), not the released code's
    mix of logits. The teacher is detached: gradients reach the student only.

    Parameters
    ----------
    sample_weights
        Optional ``[B]`` non-negative weights, normalised to mean 1, so that they change the
        balance between samples but not the loss scale.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            f"expected matching [B, C] logits, got {tuple(student_logits.shape)} and"
            f" {tuple(teacher_logits.shape)}"
        )
    teacher_logits = teacher_logits.detach()
    log_p = F.log_softmax(teacher_logits / temperature, dim=1)
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(1)
    js = jensen_shannon(log_p, log_q)
    ce = F.cross_entropy(student_logits, teacher_logits.argmax(1), reduction="none")
    per_sample = alpha * temperature**2 * kl + (1.0 - alpha) * ce + beta * js
    if sample_weights is None:
        return per_sample.mean()
    if sample_weights.shape != per_sample.shape or (sample_weights < 0).any():
        raise ValueError(f"sample_weights must be [B] and non-negative for B={len(per_sample)}")
    weights = sample_weights.detach().to(per_sample)
    return (per_sample * weights / weights.mean()).mean()


@dataclass
class DistillResult:
    """Summary of one distillation run (the student itself is trained in place)."""

    steps: int
    final_loss: float
    mean_loss_last_50: float
    teacher_student_agreement: float  # argmax agreement over the samples of the last 50 steps
    seconds: float
    teacher_seconds: float = 0.0  # of which drawing samples and labelling them with the teacher


@contextmanager
def _sampling_with_batch_statistics(generators: Sequence[Generator]) -> Iterator[None]:
    """Generators in train mode (BN on batch statistics, which DCGAN samples need), then
    their modes and BN running statistics restored, so that sampling leaves them as found."""
    saved = [(g.training, {name: b.clone() for name, b in g.named_buffers()}) for g in generators]
    for g in generators:
        g.train()
    try:
        yield
    finally:
        for g, (mode, buffers) in zip(generators, saved, strict=True):
            g.train(mode)
            for name, b in g.named_buffers():
                b.copy_(buffers[name])


@contextmanager
def training_with_frozen_batchnorm(student: nn.Module) -> Iterator[None]:
    """Student in train mode except its BatchNorm layers, whose running statistics must keep
    describing real data: generated batches would otherwise overwrite them. Modes restored."""
    modes = {module: module.training for module in student.modules()}
    student.train()
    for module in student.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.train(mode)


def _sample(generator: Generator, n: int, rng: torch.Generator) -> Tensor:
    """``n`` generator images from seeded standard-normal latents (as ``Generator.sample``)."""
    latents = torch.randn(n, generator.spec.latent_dim, generator=rng, device=rng.device)
    return generator(latents)


def draw_samples(generators: Sequence[Generator], n: int, seed: int) -> list[Tensor]:
    """``n`` seeded images from each generator, drawn as distillation draws them (BatchNorm on
    batch statistics), the generators left as found."""
    if not generators:
        return []
    device = next(generators[0].parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad(), _sampling_with_batch_statistics(generators):
        return [_sample(generator, n, rng) for generator in generators]


def _share_agreeing(matches: Iterable[Tensor]) -> float:
    return torch.cat(list(matches)).float().mean().item()


def _normalised_weights(
    weights: Sequence[float] | None, count: int, device: torch.device | str
) -> Tensor | None:
    if weights is None:
        return None
    tensor = torch.as_tensor(weights, dtype=torch.float32, device=device)
    if tensor.shape != (count,) or (tensor < 0).any() or tensor.sum() <= 0:
        raise ValueError(f"generator_weights must be {count} non-negative numbers, not all zero")
    return tensor / tensor.sum()


def distill(
    student: nn.Module,
    teacher: nn.Module,
    generators: Sequence[Generator],
    settings: Distillation,
    *,
    to_input: Callable[[Tensor], Tensor],
    generator_weights: Sequence[float] | None = None,
    sub_models: Sequence[nn.Module] = (),
    device: torch.device | str,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    log_every: int = 50,
) -> DistillResult:
    """Train ``student`` in place to match ``teacher`` on samples of the client generators.

    Every step draws ``batch_per_generator`` images from each generator (no grad, generator BN
    on batch statistics), maps them with ``to_input`` into the classifiers' input space, scores
    them with the teacher (no grad, eval mode) and takes one Adam step on :func:`kd_loss`. The
    student's BatchNorm running statistics stay frozen (see
    :func:`training_with_frozen_batchnorm`). Student, teacher and generators are moved to
    ``device``.

    Parameters
    ----------
    settings.proximal_mu
        Weight of ``mu/2 ||w - w_0||^2``, a pull of the student's parameters back to where
        distillation started (the FedAvg aggregate). Without it the student ends where client
        training from it is a poor FedAvg step: measured on a captured multi-round state
        (FashionMNIST, alpha 0.1), 300 unanchored Adam steps moved the 3136x128 dense layer by
        35% of its norm, and one FedAvg round from there lost 12 points (71.1 -> 59.0) where
        the undistilled model gained 10; the pull keeps the student near the point FedAvg's
        clients were already agreeing on.
    settings.pool_batches
        With ``pool_batches > 0`` the first that many steps draw and label fresh batches, and
        every later step reuses them in turn: the teacher (most of a step's time when it runs
        every client model) labels ``pool_batches`` batches instead of ``steps``. With
        ``pool_batches >= steps`` the run is the plain one, bit for bit.
    settings.generators_per_step
        With ``0 < generators_per_step < len(generators)`` each step draws from that many
        generators only, taken in turn from a seeded shuffle, so that a step's batch (and the
        student's cost) stays ``generators_per_step x batch_per_generator`` however many
        clients uploaded one; every generator still serves ``steps x generators_per_step /
        len(generators)`` steps. ``0`` (or at least ``len(generators)``) draws from all.
    settings.ema
        With ``ema > 0`` the student ends as the exponential moving average (that decay per
        step, ``torch.optim.swa_utils``) of its weights over the steps instead of the last
        iterate; its BatchNorm statistics are frozen anyway. On generator samples the last
        iterate drifts as steps go on: measured on a captured one-shot MNIST state (alpha 0.1,
        seed 2, teacher 96.29), 300 / 600 / 1500 steps gave 94.84 / 93.85 / 92.37, the
        average at 0.998 96.27 / 96.42 / 95.95. The agreement reported is the last iterate's.
    sub_models
        Views of the student's width sub-models (``common.submodels.SlicedView``): each adds
        its own :func:`kd_loss` against the same teacher outputs, so the student's weights are
        fitted for the full model and for every tier's slice of it at once. Without them,
        distilling into the full model alone wrecked the small tiers' slices (measured:
        one-shot FashionMNIST, quarter width 51.9 -> 25.0).
    generator_weights
        Optional per-generator weights (client sizes, class coverage): each generator's samples
        weigh in the loss in proportion. ``None`` weighs every generator equally, as the
        released code does.
    seed
        Seeds the latent draws, so a run is repeatable given the models.
    progress
        Receives a short line every ``log_every`` steps and at the last step.
    """
    steps, batch_per_generator = settings.steps, settings.batch_per_generator
    proximal_mu, ema = settings.proximal_mu, settings.ema
    if steps == 0:
        return DistillResult(0, math.nan, math.nan, math.nan, 0.0)
    if steps < 0 or batch_per_generator < 1 or not generators or proximal_mu < 0:
        raise ValueError(
            "need steps >= 0, batch_per_generator >= 1, proximal_mu >= 0 and at least one generator"
        )
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema must lie in [0, 1), got {ema}")
    start = time.perf_counter()
    student.to(device)
    teacher.to(device).eval()
    for g in generators:
        g.to(device)
    weights = _normalised_weights(generator_weights, len(generators), device)
    rng = torch.Generator(device=device).manual_seed(seed)
    per_step = settings.generators_per_step
    if not 0 < per_step < len(generators):
        per_step = len(generators)
    rotation = torch.randperm(len(generators), generator=torch.Generator().manual_seed(seed))
    parameters = list(student.parameters())
    anchor = [p.detach().clone() for p in parameters] if proximal_mu > 0 else None
    optimizer = torch.optim.Adam(parameters, lr=settings.lr)
    average = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(ema)) if ema else None
    losses: list[float] = []
    agreements: deque[Tensor] = deque(maxlen=50)  # per-sample argmax matches, last 50 steps
    pool: list[tuple[Tensor, Tensor, Tensor | None]] = []  # when settings.pool_batches
    teacher_seconds = 0.0

    def labelled_batch(step: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Images of the step's generators, their teacher logits and per-sample weights."""
        nonlocal teacher_seconds
        started = time.perf_counter()
        if per_step == len(generators):  # all of them in partition order: the plain run
            chosen = list(range(len(generators)))
        else:
            first = (step - 1) * per_step
            chosen = [int(rotation[(first + j) % len(generators)]) for j in range(per_step)]
        with torch.no_grad():
            samples = [_sample(generators[i], batch_per_generator, rng) for i in chosen]
            images = to_input(torch.cat(samples))
            teacher_logits = teacher(images)
        sample_weights = None
        if weights is not None:
            sample_weights = weights[chosen].repeat_interleave(batch_per_generator)
        teacher_seconds += time.perf_counter() - started
        return images, teacher_logits, sample_weights

    with _sampling_with_batch_statistics(generators), training_with_frozen_batchnorm(student):
        for step in range(1, steps + 1):
            if not settings.pool_batches:
                images, teacher_logits, sample_weights = labelled_batch(step)
            else:  # the teacher labels each pooled batch once; later steps go round the pool
                if len(pool) < settings.pool_batches:
                    pool.append(labelled_batch(step))
                images, teacher_logits, sample_weights = pool[(step - 1) % settings.pool_batches]
            student_logits = student(images)
            loss = kd_loss(
                student_logits,
                teacher_logits,
                alpha=settings.alpha,
                beta=settings.beta,
                temperature=settings.temperature,
                sample_weights=sample_weights,
            )
            for sub_model in sub_models:
                loss = loss + kd_loss(
                    sub_model(images),
                    teacher_logits,
                    alpha=settings.alpha,
                    beta=settings.beta,
                    temperature=settings.temperature,
                    sample_weights=sample_weights,
                )
            if anchor is not None:
                loss = loss + 0.5 * proximal_mu * squared_distance(parameters, anchor)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if average is not None:
                average.update_parameters(student)
            losses.append(loss.item())
            agreements.append(student_logits.argmax(1) == teacher_logits.argmax(1))
            if progress is not None and (step % log_every == 0 or step == steps):
                agreement = _share_agreeing(agreements)
                progress(
                    f"distill step {step}/{steps}: loss {losses[-1]:.4f},"
                    f" agreement (last {len(agreements)} steps) {agreement:.3f}"
                )
    if average is not None:
        with torch.no_grad():
            for parameter, averaged in zip(parameters, average.module.parameters(), strict=True):
                parameter.copy_(averaged)
    return DistillResult(
        steps=steps,
        final_loss=losses[-1],
        mean_loss_last_50=sum(losses[-50:]) / len(losses[-50:]),
        teacher_student_agreement=_share_agreeing(agreements),
        seconds=time.perf_counter() - start,
        teacher_seconds=teacher_seconds,
    )
