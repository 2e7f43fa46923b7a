"""Distillation loss (KL + hard-label CE + true JS) and the distillation loop."""

import copy
import math

import pytest
import torch
from torch import nn

from common.config import Distillation
from common.models import Generator, GeneratorSpec
from common.train import squared_distance
from server_app.distill import distill, jensen_shannon, kd_loss
from tests.devices import DEVICES


def _js(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    return jensen_shannon(p_logits.log_softmax(1), q_logits.log_softmax(1))


def test_identical_distributions_leave_only_hard_label_term() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    ce = torch.nn.functional.cross_entropy(logits, logits.argmax(1))

    loss = kd_loss(logits, logits, alpha=0.8, beta=1.0)

    torch.testing.assert_close(loss, 0.2 * ce)


def test_two_class_case_by_hand() -> None:
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # p = (3/4, 1/4)
    student = torch.zeros(1, 2)  # q = (1/2, 1/2), m = (5/8, 3/8)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    ce = math.log(2.0)
    js = 0.5 * (
        0.75 * math.log(0.75 / 0.625)
        + 0.25 * math.log(0.25 / 0.375)
        + 0.5 * math.log(0.5 / 0.625)
        + 0.5 * math.log(0.5 / 0.375)
    )

    assert kd_loss(student, teacher).item() == pytest.approx(0.8 * kl + 0.2 * ce + js, abs=1e-6)
    # T = 2 with doubled teacher logits gives the same p, and KL gains the factor T^2;
    # the hard-label CE uses the raw student logits.
    loss_t2 = kd_loss(student, 2 * teacher, temperature=2.0).item()
    assert loss_t2 == pytest.approx(0.8 * 4 * kl + 0.2 * ce + js, abs=1e-6)


def test_js_is_symmetric_bounded_by_ln2_and_finite_at_extremes() -> None:
    a = torch.tensor([[1000.0, -1000.0], [2.0, 0.0]])
    b = torch.tensor([[-1000.0, 1000.0], [0.0, 1.0]])

    js_ab, js_ba = _js(a, b), _js(b, a)

    assert torch.isfinite(js_ab).all()
    torch.testing.assert_close(js_ab, js_ba)
    assert js_ab[0].item() == pytest.approx(math.log(2.0), abs=1e-6)  # disjoint supports
    assert (js_ab <= math.log(2.0) + 1e-6).all() and (js_ab >= 0).all()
    assert _js(a, a).abs().max() < 1e-6


def test_flat_teacher_still_pulls_student_to_its_argmax() -> None:
    teacher = torch.tensor([[1e-3, 0.0, 0.0, 0.0]])  # soft output ~uniform, argmax class 0
    student = torch.zeros(1, 4, requires_grad=True)

    loss = kd_loss(student, teacher, alpha=0.8, beta=1.0)
    loss.backward()

    assert loss.item() == pytest.approx(0.2 * math.log(4.0), abs=1e-4)
    assert student.grad[0, 0] < -0.1  # raising the argmax logit lowers the loss
    soft_only = kd_loss(student, teacher, alpha=1.0, beta=1.0)
    assert soft_only.item() < 1e-6


def test_gradients_reach_student_only() -> None:
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)

    kd_loss(student, teacher).backward()

    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_sample_weights_are_normalised_to_mean_one() -> None:
    student, teacher = torch.randn(2, 3), torch.randn(2, 3)

    weighted = kd_loss(student, teacher, sample_weights=torch.tensor([5.0, 0.0]))

    torch.testing.assert_close(weighted, kd_loss(student[:1], teacher[:1]))
    same = kd_loss(student, teacher, sample_weights=torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(same, kd_loss(student, teacher))


def _tiny_problem() -> tuple[nn.Module, nn.Module, list[Generator]]:
    """A linear teacher on 1x4x4 images, a small student with BatchNorm, two generators."""
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        teacher[1].weight.mul_(4.0)
    student = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)
    )
    with torch.no_grad():
        student[2].running_mean.uniform_(-0.2, 0.2)
        student[2].running_var.uniform_(0.5, 1.5)
    spec = GeneratorSpec(latent_dim=8, image_shape=(1, 4, 4), base_channels=4)
    return teacher, student, [Generator(spec), Generator(spec)]


@torch.no_grad()
def _agreement_and_loss(
    student: nn.Module, teacher: nn.Module, images: torch.Tensor
) -> tuple[float, float]:
    student.eval()
    s, t = student(images), teacher(images)
    return (s.argmax(1) == t.argmax(1)).float().mean().item(), kd_loss(s, t).item()


@pytest.mark.parametrize("device", DEVICES)
def test_distill_reduces_loss_and_raises_agreement(device) -> None:
    teacher, student, generators = _tiny_problem()
    with torch.no_grad():
        images = torch.cat([g.train()(torch.randn(128, 8)) for g in generators])
    for g in generators:
        g.eval()
    generator_buffers = [{k: v.clone() for k, v in g.state_dict().items()} for g in generators]
    bn_before = {k: v.clone() for k, v in student[2].named_buffers()}
    agreement_before, loss_before = _agreement_and_loss(student, teacher, images)
    student.train()
    lines: list[str] = []

    result = distill(
        student,
        teacher,
        generators,
        Distillation(steps=200, batch_per_generator=32, lr=1e-2),
        to_input=lambda x: x,
        device=device,
        progress=lines.append,
    )

    assert next(student.parameters()).device.type == device
    for model in (student, teacher, *generators):
        model.cpu()
    agreement_after, loss_after = _agreement_and_loss(student, teacher, images)
    assert result.steps == 200 and len(lines) == 4
    assert loss_after < 0.7 * loss_before
    assert agreement_after > agreement_before and agreement_after >= 0.9
    assert result.teacher_student_agreement >= 0.85
    assert result.mean_loss_last_50 < loss_before
    # The student's BN running statistics describe real data and must not move.
    for name, value in student[2].named_buffers():
        torch.testing.assert_close(value, bn_before[name])
    # Generators come back in their mode with their running statistics untouched.
    for g, saved in zip(generators, generator_buffers, strict=True):
        assert not g.training
        for name, value in g.state_dict().items():
            torch.testing.assert_close(value, saved[name])


def _distance(model: nn.Module, start: list[torch.Tensor]) -> float:
    return squared_distance(model.parameters(), start).sqrt().item()


def test_proximal_pull_keeps_the_student_near_its_start_and_still_distills() -> None:
    teacher, student, generators = _tiny_problem()
    start = [p.detach().clone() for p in student.parameters()]
    with torch.no_grad():
        images = torch.cat([g.train()(torch.randn(128, 8)) for g in generators])
    _, loss_before = _agreement_and_loss(student, teacher, images)
    moved = {}
    for mu in (0.0, 1.0, 100.0):
        trained = copy.deepcopy(student)
        distill(
            trained,
            teacher,
            generators,
            Distillation(steps=100, lr=1e-2, proximal_mu=mu),
            to_input=lambda x: x,
            device="cpu",
        )
        moved[mu] = _distance(trained, start)
        if mu == 1.0:
            assert _agreement_and_loss(trained, teacher, images)[1] < loss_before

    assert moved[100.0] < moved[1.0] < moved[0.0]
    assert moved[100.0] < 0.2 * moved[0.0]
    with pytest.raises(ValueError, match="proximal_mu"):
        distill(
            student,
            teacher,
            generators,
            Distillation(steps=1, proximal_mu=-1.0),
            to_input=lambda x: x,
            device="cpu",
        )


def test_distill_restores_student_modes_and_checks_generator_weights() -> None:
    teacher, student, generators = _tiny_problem()
    student.eval()

    result = distill(
        student,
        teacher,
        generators,
        Distillation(steps=3),
        to_input=lambda x: x,
        generator_weights=[3.0, 1.0],
        device="cpu",
    )

    assert result.steps == 3 and math.isfinite(result.final_loss)
    assert not any(m.training for m in student.modules())
    with pytest.raises(ValueError):
        distill(
            student,
            teacher,
            generators,
            Distillation(steps=1),
            to_input=lambda x: x,
            generator_weights=[1.0],
            device="cpu",
        )


def test_zero_steps_return_immediately_and_leave_student_alone() -> None:
    teacher, student, generators = _tiny_problem()
    before = {k: v.clone() for k, v in student.state_dict().items()}

    result = distill(
        student, teacher, generators, Distillation(steps=0), to_input=lambda x: x, device="cpu"
    )

    assert result.steps == 0
    for name, value in student.state_dict().items():
        torch.testing.assert_close(value, before[name])


def test_ema_student_is_the_moving_average_of_the_iterates() -> None:
    """Step 1's weights, then ``decay * w1 + (1 - decay) * w2``: the iterates of a plain run
    with the same seed, so the average is of this run's own trajectory, not a later copy."""
    teacher, student, generators = _tiny_problem()
    decay = 0.75

    def run(steps: int, ema: float) -> list[torch.Tensor]:
        trained = copy.deepcopy(student)
        distill(
            trained,
            teacher,
            generators,
            Distillation(steps=steps, lr=1e-2, ema=ema),
            to_input=lambda x: x,
            device="cpu",
            seed=3,
        )
        return [p.detach() for p in trained.parameters()]

    first, second = run(1, 0.0), run(2, 0.0)
    for averaged, w1 in zip(run(1, decay), first, strict=True):
        torch.testing.assert_close(averaged, w1)
    for averaged, w1, w2 in zip(run(2, decay), first, second, strict=True):
        torch.testing.assert_close(averaged, decay * w1 + (1 - decay) * w2)
    assert any(not torch.equal(a, b) for a, b in zip(run(2, decay), second, strict=True))

    # Over a longer run the average still distills, and trails the last iterate.
    with torch.no_grad():
        images = torch.cat([g.train()(torch.randn(128, 8)) for g in generators])
    _, loss_before = _agreement_and_loss(student, teacher, images)
    start = [p.detach().clone() for p in student.parameters()]
    last, averaged = copy.deepcopy(student), copy.deepcopy(student)
    distill(
        last,
        teacher,
        generators,
        Distillation(steps=60, lr=1e-2),
        to_input=lambda x: x,
        device="cpu",
    )
    distill(
        averaged,
        teacher,
        generators,
        Distillation(steps=60, lr=1e-2, ema=0.9),
        to_input=lambda x: x,
        device="cpu",
    )
    assert _agreement_and_loss(averaged, teacher, images)[1] < loss_before
    assert _distance(averaged, start) < _distance(last, start)
    with pytest.raises(ValueError, match="ema"):
        distill(
            student,
            teacher,
            generators,
            Distillation(steps=1, ema=1.0),
            to_input=lambda x: x,
            device="cpu",
        )


def test_a_pool_labels_each_batch_once_and_a_full_pool_is_the_plain_run() -> None:
    teacher, student, generators = _tiny_problem()
    calls = []
    teacher.register_forward_hook(lambda module, args, out: calls.append(1))

    def run(**pool) -> list[torch.Tensor]:
        trained = copy.deepcopy(student)
        settings = Distillation(steps=6, batch_per_generator=4, lr=1e-2, **pool)
        distill(trained, teacher, generators, settings, to_input=lambda x: x, device="cpu", seed=1)
        return [p.detach() for p in trained.parameters()]

    plain = run()
    assert len(calls) == 6
    calls.clear()
    pooled = run(pool_batches=2)
    assert len(calls) == 2  # the teacher labelled two batches; six steps went round them
    assert any(not torch.equal(a, b) for a, b in zip(pooled, plain, strict=True))
    for a, b in zip(run(pool_batches=6), plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_generators_per_step_bounds_the_batch_and_takes_every_generator_in_turn() -> None:
    teacher, student, generators = _tiny_problem()
    spec = generators[0].spec
    generators = generators + [Generator(spec) for _ in range(3)]  # five generators
    drawn: list[int] = []
    for index, generator in enumerate(generators):
        generator.register_forward_hook(lambda module, args, out, i=index: drawn.append(i))
    batches: list[int] = []
    teacher.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))

    def run(**settings) -> list[torch.Tensor]:
        trained = copy.deepcopy(student)
        distill(
            trained,
            teacher,
            generators,
            Distillation(steps=5, batch_per_generator=4, lr=1e-2, **settings),
            to_input=lambda x: x,
            generator_weights=[1.0, 2.0, 3.0, 4.0, 5.0],
            device="cpu",
            seed=3,
        )
        return [p.detach() for p in trained.parameters()]

    plain = run()
    assert batches == [20] * 5 and sorted(drawn) == sorted(list(range(5)) * 5)
    batches.clear()
    drawn.clear()
    capped = run(generators_per_step=2)
    assert batches == [8] * 5  # 2 generators x 4 samples, however many generators there are
    assert sorted(drawn) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # 10 draws, each generator in turn
    assert all(drawn[2 * s] != drawn[2 * s + 1] for s in range(5))  # two different a step
    assert any(not torch.equal(a, b) for a, b in zip(capped, plain, strict=True))
    for a, b in zip(run(generators_per_step=5), plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # as many as there are: the plain run
