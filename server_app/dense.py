"""DENSE-style data-free one-shot distillation (Zhang et al., NeurIPS 2022), server side only.

The server trains its own generator from scratch against the frozen client ensemble and, in
alternation, distills the ensemble into the student on that generator's samples. Every
iteration makes

1. a generator step on ``CE(t(x), y) + lambda_bn L_bn + lambda_adv L_adv``: ``x = G(z, y)``
   should be classified as its target ``y`` by the teacher ``t``, match the BatchNorm
   statistics of every client model (DeepInversion, :class:`BatchNormInversionLoss`, averaged
   over the clients whose models have BatchNorm: with mixed architectures an MLP's adds
   nothing) and be a sample on which the student ``s`` disagrees with the teacher:
   ``L_adv = -mean(mask * KL(t(x) || s(x)))``. As in DENSE's released code, ``mask`` keeps the
   samples on which the two still agree (same argmax): the term pushes towards the decision
   boundaries without being rewarded, unboundedly, for samples the student already gets wrong.
   Teacher and student are frozen (eval mode, no parameter gradients) in this step;
2. a student step on :func:`server_app.distill.kd_loss` over fresh, detached samples, with the
   student's BatchNorm statistics frozen, as in :func:`server_app.distill.distill`.

Targets ``y`` are drawn uniformly from the classes the clients hold. DENSE conditions samples on
their targets by optimising the latents together with the generator; here the generator is the
project's DCGAN (:func:`common.models.build_generator`) fed ``z + e_y``, with ``e_y`` a learned
per-class embedding (:class:`ConditionalGenerator`), so fresh latents are conditioned as well.
DENSE's image pool and augmentation are left out: the student trains on fresh samples only.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.config import DenseTraining
from common.generator import BatchNormInversionLoss, frozen
from common.models import GeneratorSpec, build_generator
from server_app.distill import DistillResult, kd_loss, training_with_frozen_batchnorm


class ConditionalGenerator(nn.Module):
    """The project's generator on the latent ``z + e_y``: a learned offset per target class."""

    def __init__(self, spec: GeneratorSpec, num_classes: int) -> None:
        super().__init__()
        self.spec = spec
        self.generator = build_generator(spec)
        self.embedding = nn.Embedding(num_classes, spec.latent_dim)  # N(0, 1): classes apart

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        """Images in [-1, 1] (tanh) for latents ``z [B, latent_dim]`` and targets ``y [B]``."""
        return self.generator(z + self.embedding(y))


@dataclass
class DenseResult(DistillResult):
    """:class:`DistillResult` of the student steps, plus the generator's side.

    ``history`` holds window means every ``log_every`` steps (and at the last step) of
    ``generator`` (its total loss), ``ce``, ``bn``, ``adv``, ``kd`` and ``agreement`` (share of
    the student-step samples on which student and teacher agree, before the update).
    """

    history: list[dict[str, float]] = field(default_factory=list)
    generator: ConditionalGenerator | None = None


def adversarial_term(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``-mean(mask * KL(t || s))`` per sample, ``mask`` = same argmax (DENSE's ``loss_adv``)."""
    log_t = F.log_softmax(teacher_logits, dim=1)
    log_s = F.log_softmax(student_logits, dim=1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(1)
    mask = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    return -(kl * mask).mean()


def train_dense(
    student: nn.Module,
    teacher: nn.Module,
    client_models: Sequence[nn.Module],
    settings: DenseTraining,
    *,
    spec: GeneratorSpec,
    num_classes: int,
    classes: Sequence[int],
    to_input: Callable[[Tensor], Tensor],
    device: torch.device | str,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    log_every: int = 50,
) -> DenseResult:
    """Train a fresh generator against ``teacher`` and distill ``teacher`` into ``student``.

    The student is trained in place; the teacher and the client models come back exactly as
    they came (eval mode inside, their modes and ``requires_grad`` flags restored after).

    Parameters
    ----------
    teacher
        The client ensemble (log-probabilities or logits ``[B, C]``), e.g. a
        ``ProbabilityMixture`` over ``client_models``.
    client_models
        The models whose BatchNorm2d running statistics the samples should match; they must be
        the ones ``teacher`` runs, since the statistics are read during its forward pass.
    spec
        The generator's architecture (latent size, image shape, width).
    classes
        The targets: classes at least one client holds, drawn uniformly.
    to_input
        Maps generator output in [-1, 1] into classifier space.
    settings
        ``steps`` iterations, each ``generator_steps`` generator steps and one student step,
        of ``batch_size`` samples (at least 2, for the generator's BatchNorm); learning rates
        and loss weights.
    seed
        Seeds the generator's initialisation and every latent and target draw, so a run is
        repeatable given the models; the caller's RNG is left alone.
    progress
        Receives a short line every ``log_every`` steps and at the last step.
    """
    steps, batch_size, generator_steps = (
        settings.steps,
        settings.batch_size,
        settings.generator_steps,
    )
    lambda_bn, lambda_adv = settings.lambda_bn, settings.lambda_adv
    if steps == 0:
        return DenseResult(0, math.nan, math.nan, math.nan, 0.0)
    if steps < 0 or batch_size < 2 or generator_steps < 1:
        raise ValueError("need steps >= 0, batch_size >= 2 and generator_steps >= 1")
    if not classes or not all(0 <= c < num_classes for c in classes):
        raise ValueError(f"classes must be a non-empty subset of range({num_classes})")
    start = time.perf_counter()
    student.to(device)
    teacher.to(device)
    for model in client_models:
        model.to(device)
    targets = torch.as_tensor(list(classes), dtype=torch.long, device=device)
    with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG alone
        torch.manual_seed(seed)
        generator = ConditionalGenerator(spec, num_classes)
    generator.to(device).train()  # BatchNorm on batch statistics throughout, as DCGAN samples
    opt_g = torch.optim.Adam(generator.parameters(), lr=settings.gen_lr, betas=settings.betas)
    opt_s = torch.optim.Adam(student.parameters(), lr=settings.kd_lr)
    rng = torch.Generator(device=device).manual_seed(seed)

    def draw() -> tuple[Tensor, Tensor]:
        z = torch.randn(batch_size, spec.latent_dim, generator=rng, device=rng.device)
        pick = torch.randint(len(targets), (batch_size,), generator=rng, device=rng.device)
        return z, targets[pick]

    losses: list[float] = []
    agreements: deque[Tensor] = deque(maxlen=50)  # per-sample argmax matches, last 50 steps
    history: list[dict[str, float]] = []
    window: dict[str, float] = {}
    window_start = 0
    with ExitStack() as stack:
        stack.enter_context(frozen(teacher))
        for model in client_models:
            stack.enter_context(frozen(model))
        inversions = (
            [stack.enter_context(BatchNormInversionLoss(m)) for m in client_models]
            if lambda_bn
            else []
        )
        stack.enter_context(training_with_frozen_batchnorm(student))
        for step in range(1, steps + 1):
            # (1) generator: teacher's target, clients' BN statistics, disagreement.
            with frozen(student):
                for _ in range(generator_steps):
                    z, y = draw()
                    images = to_input(generator(z, y))
                    teacher_logits = teacher(images)
                    ce = F.cross_entropy(teacher_logits, y)
                    # over the client models whose BatchNorm ran (an MLP has none to match)
                    terms = [inv.value() for inv in inversions if inv.ran]
                    bn = torch.stack(terms).mean() if terms else ce.new_zeros(())
                    adv = (
                        adversarial_term(student(images), teacher_logits)
                        if lambda_adv
                        else ce.new_zeros(())
                    )
                    g_loss = ce + lambda_bn * bn + lambda_adv * adv
                    opt_g.zero_grad(set_to_none=True)
                    g_loss.backward()
                    opt_g.step()

            # (2) student: KD on fresh, detached samples.
            with torch.no_grad():
                z, y = draw()
                images = to_input(generator(z, y))
                teacher_logits = teacher(images)
            student_logits = student(images)
            loss = kd_loss(
                student_logits,
                teacher_logits,
                alpha=settings.alpha,
                beta=settings.beta,
                temperature=settings.temperature,
            )
            opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_s.step()
            losses.append(loss.item())
            agree = student_logits.argmax(1) == teacher_logits.argmax(1)
            agreements.append(agree)

            terms = {
                "generator": g_loss.item(),
                "ce": ce.item(),
                "bn": bn.item(),
                "adv": adv.item(),
                "kd": losses[-1],
                "agreement": agree.float().mean().item(),
            }
            for name, value in terms.items():
                window[name] = window.get(name, 0.0) + value
            if step % log_every == 0 or step == steps:
                count = step - window_start
                record = {"step": float(step), **{k: v / count for k, v in window.items()}}
                history.append(record)
                window, window_start = {}, step
                if progress is not None:
                    line = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step")
                    progress(f"dense step {step}/{steps}: {line}")
    generator.eval()
    return DenseResult(
        steps=steps,
        final_loss=losses[-1],
        mean_loss_last_50=sum(losses[-50:]) / len(losses[-50:]),
        teacher_student_agreement=torch.cat(list(agreements)).float().mean().item(),
        seconds=time.perf_counter() - start,
        history=history,
        generator=generator,
    )
