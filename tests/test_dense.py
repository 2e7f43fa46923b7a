"""The DENSE-style baseline: server-side generator + distillation (server_app/dense.py)."""

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.config import ConfigError, DenseTraining, pyproject_defaults
from common.data import dataset_info, generator_to_classifier_input
from common.models import GeneratorSpec, build_classifier
from server_app.dense import adversarial_term, train_dense
from server_app.moe import ExpertEnsemble, ProbabilityMixture
from server_app.strategies import STRATEGIES, validate_run_config
from server_app.strategies.baselines import DenseStrategy
from server_app.strategies.teacher import ClientModels
from tests.fakedata import PYPROJECT, class_pattern_images, write_fake_fashion_mnist
from tests.runs import read_json, run

INFO = dataset_info("fashion-mnist")  # 1x28x28, 10 classes
SPEC = GeneratorSpec(latent_dim=16, image_shape=INFO.image_shape, base_channels=8)
CLIENT_CLASSES = [(0, 1, 2), (2, 3, 4)]  # label skew: each client sees three classes
CLASSES = sorted({c for held in CLIENT_CLASSES for c in held})


def _to_input(x: torch.Tensor) -> torch.Tensor:
    return generator_to_classifier_input(x, INFO)


def _cnn():
    return build_classifier("cnn", num_classes=10, in_shape=INFO.image_shape, width=0.25)


def _normalised(pixels: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(pixels, dtype=torch.float32).unsqueeze(1) / 255
    return (x - INFO.mean[0]) / INFO.std[0]


@pytest.fixture(scope="module")
def clients() -> list[dict[str, torch.Tensor]]:
    """Two small CNNs, each trained briefly on its own classes of the fake pattern images."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    states = []
    for held in CLIENT_CLASSES:
        labels = rng.choice(held, size=96)
        images = _normalised(class_pattern_images(labels, rng))
        targets = torch.as_tensor(labels)
        model = _cnn().train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for step in range(12):
            batch = slice(32 * (step % 3), 32 * (step % 3) + 32)
            loss = F.cross_entropy(model(images[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def _teacher(states) -> ProbabilityMixture:
    ensemble = ExpertEnsemble(_cnn(), dict(enumerate(states)))
    return ProbabilityMixture(ensemble, torch.full((len(states), 10), 1.0 / len(states))).eval()


def _student(states) -> torch.nn.Module:
    """The FedAvg of the clients, as the strategy hands it over."""
    student = _cnn()
    student.load_state_dict(
        {
            k: sum(s[k].float() for s in states).div(len(states)).to(v.dtype)
            for k, v in states[0].items()
        }
    )
    return student


def _run(states, steps: int, **overrides):
    student, teacher = _student(states), _teacher(states)
    options = {
        "spec": SPEC,
        "num_classes": 10,
        "classes": CLASSES,
        "to_input": _to_input,
        "steps": steps,
        "batch_size": 16,
        "kd_lr": 1e-3,
        "gen_lr": 1e-3,
        "device": "cpu",
        "seed": 3,
        "log_every": 10,
    }
    options.update(overrides)
    rng_before = torch.random.get_rng_state()
    settings, options = _with_settings(DenseTraining, options)
    result = train_dense(student, teacher, list(teacher.clients.members), settings, **options)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG untouched
    return student, teacher, result


def _states_equal(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_train_dense_trains_the_student_only_and_is_repeatable(clients) -> None:
    teacher_before = copy.deepcopy(_teacher(clients).state_dict())
    student_before = _student(clients).state_dict()
    lines: list[str] = []
    student, teacher, result = _run(clients, steps=4, progress=lines.append, log_every=2)
    assert not _states_equal(student.state_dict(), student_before)
    # BN running statistics and weights of every client model stay as they were
    assert _states_equal(teacher.state_dict(), teacher_before)
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    # the student's BatchNorm statistics describe real data: generated batches never move them
    for name, value in student.state_dict().items():
        if "running" in name:
            assert torch.equal(value, student_before[name]), name
    assert student.training  # modes handed back as they were (train mode, from build)
    assert result.steps == 4 and len(lines) == 2 and "dense step 4/4" in lines[-1]
    assert [r["step"] for r in result.history] == [2.0, 4.0]
    assert 0.0 <= result.teacher_student_agreement <= 1.0

    again, _, _ = _run(clients, steps=4)
    assert _states_equal(again.state_dict(), student.state_dict())
    other, _, _ = _run(clients, steps=4, seed=4)
    assert not _states_equal(other.state_dict(), student.state_dict())


def _agreement(generator, teacher, student, n: int = 256) -> float:
    """Share of ``n`` fixed-seed generator samples on which student and teacher agree."""
    rng = torch.Generator().manual_seed(123)
    z = torch.randn(n, SPEC.latent_dim, generator=rng)
    y = torch.tensor(CLASSES)[torch.randint(len(CLASSES), (n,), generator=rng)]
    generator.train()  # batch statistics, as in training
    with torch.no_grad():
        images = _to_input(generator(z, y))
        agree = student.eval()(images).argmax(1) == teacher(images).argmax(1)
    return agree.float().mean().item()


def test_generator_learns_the_targets_and_the_student_follows(clients) -> None:
    """Over 30 iterations the teacher comes to classify generator samples as their targets
    (fails without generator updates: the CE then falls by about a tenth), and on the final
    generator's samples the trained student agrees with the teacher far more than the student
    it started from (fails without student updates: the two are then equal)."""
    student, teacher, result = _run(clients, steps=30, log_every=5)
    first, last = result.history[0], result.history[-1]
    assert last["ce"] < 0.7 * first["ce"]
    assert last["bn"] < first["bn"]
    trained = _agreement(result.generator, teacher, student)
    initial = _agreement(result.generator, teacher, _student(clients))
    assert trained > initial + 0.2


def test_zero_steps_and_bad_arguments(clients) -> None:
    student, _, result = _run(clients, steps=0)
    assert result.steps == 0 and np.isnan(result.final_loss)
    assert _states_equal(student.state_dict(), _student(clients).state_dict())
    with pytest.raises(ValueError, match="batch_size"):
        _run(clients, steps=1, batch_size=1)
    with pytest.raises(ValueError, match="classes"):
        _run(clients, steps=1, classes=[10])


def test_adversarial_term_counts_only_samples_the_two_agree_on() -> None:
    teacher = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # agrees on the first sample only
    log_t, log_s = teacher[:1].log_softmax(1), student[:1].log_softmax(1)
    kl_first = (log_t.exp() * (log_t - log_s)).sum()
    assert torch.allclose(adversarial_term(student, teacher), -kl_first / 2)


def _config(**overrides):
    values = pyproject_defaults(PYPROJECT)
    values.update(
        {
            "strategy": "dense",
            "device": "cpu",
            "model-width": 0.25,
            "gen-latent-dim": 16,
            "gen-channels": 8,
            "kd-steps": 3,
            "kd-batch-per-generator": 4,
        }
    )
    values.update(overrides)
    return validate_run_config(values)


def test_config_accepts_dense_and_checks_its_weights() -> None:
    cfg = _config()
    assert cfg.strategy == "dense" and STRATEGIES["dense"] is DenseStrategy
    assert cfg.dense_lambda_bn == 1.0 and cfg.dense_lambda_adv == 1.0  # DENSE's values
    with pytest.raises(ConfigError, match="\n  dense-lambda-bn: "):
        _config(**{"dense-lambda-bn": -1.0})
    with pytest.raises(ConfigError, match="\n  kd-round: "):  # runs the kd-round schedule
        _config(**{"kd-round": 11})


def _strategy(evaluated: list | None = None) -> DenseStrategy:
    def evaluate_model(model: torch.nn.Module) -> dict[str, float]:
        if evaluated is not None:
            evaluated.append(model)
        return {"accuracy": 0.5, "loss": 1.0}

    cfg = _config()
    return DenseStrategy(
        cfg, _cnn(), INFO, device=torch.device("cpu"), evaluate_model=evaluate_model
    )


def test_dense_clients_send_no_generator_and_no_prototypes() -> None:
    strategy = _strategy()
    for server_round in range(1, strategy.cfg.num_rounds + 1):
        instructions = strategy.instructions(server_round)
        assert instructions.train_generator is False
        assert instructions.send_prototypes is False
        assert strategy.generator_signature(server_round) is None
        assert not strategy.prototypes_expected(server_round)


def test_dense_teach_reports_the_kd_figures(clients) -> None:
    evaluated: list = []
    strategy = _strategy(evaluated)
    student = _student(clients)
    before = copy.deepcopy(student.state_dict())
    counts = np.zeros((2, 10), dtype=int)
    for row, held in enumerate(CLIENT_CLASSES):
        counts[row, list(held)] = 30
    figures = strategy.teach(student, ClientModels(clients, counts))
    for key in ("teacher-accuracy", "pre-kd-accuracy", "post-kd-accuracy", "kd-seconds"):
        assert key in figures, key
    assert 0.0 <= figures["kd-agreement"] <= 1.0
    assert isinstance(evaluated[0], ProbabilityMixture)  # the teacher is the client ensemble
    assert evaluated[1] is student and evaluated[2] is student
    assert not _states_equal(student.state_dict(), before)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data"))


@pytest.mark.integration
def test_dense_runs_in_process_without_client_generators(data_root, tmp_path) -> None:
    _, folder = run(data_root, tmp_path, strategy="dense")
    kd = read_json(folder, "metrics.json")["rounds"]["2"]
    for key in ("teacher-accuracy", "pre-kd-accuracy", "post-kd-accuracy", "kd-agreement"):
        assert 0.0 <= kd[key] <= 1.0, key
    assert kd["kd-seconds"] > 0
    participation = read_json(folder, "participation.json")
    assert all(len(r["replied"]) == 3 for r in participation.values())
    assert not (folder / "generator_samples").exists()  # no client generator reached the server


def _with_settings(view, options: dict) -> tuple:
    """``options`` split into the ``view`` dataclass (its fields) and the other keywords."""
    names = {f.name for f in dataclasses.fields(view)}
    settings = view(**{k: v for k, v in options.items() if k in names})
    return settings, {k: v for k, v in options.items() if k not in names}
