"""Experts (count-weighted averages), the vmapped expert ensemble and the prototype bank."""

import numpy as np
import pytest
import torch

from common.models import build_classifier
from server_app.moe import ExpertEnsemble, PrototypeBank, build_experts, strongest_holders


def _state(value: float, tracked: int) -> dict[str, torch.Tensor]:
    return {
        "w": torch.full((2, 2), value),
        "bn.running_mean": torch.full((2,), 10 * value),
        "bn.num_batches_tracked": torch.tensor(tracked),
    }


def _trained_like_classifier(seed: int) -> torch.nn.Module:
    """A small CNN with non-trivial weights and BN running statistics."""
    torch.manual_seed(seed)
    model = build_classifier("cnn", num_classes=3, in_shape=(1, 8, 8), width=0.25)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8) * (1 + seed))
    return model.eval()


def test_expert_is_count_weighted_average_of_clients() -> None:
    states = [_state(1.0, 3), _state(2.0, 7), _state(4.0, 5)]
    counts = np.array([[1, 0], [3, 0], [0, 2]])

    experts = build_experts(states, counts)

    assert torch.allclose(experts[0]["w"], torch.full((2, 2), (1 * 1.0 + 3 * 2.0) / 4))
    assert torch.allclose(experts[0]["bn.running_mean"], torch.full((2,), 17.5))
    # Class 1 is held only by client 2: the others contribute nothing.
    assert torch.equal(experts[1]["w"], torch.full((2, 2), 4.0))


def test_num_batches_tracked_takes_max_over_holders() -> None:
    states = [_state(1.0, 3), _state(2.0, 7), _state(4.0, 5)]
    experts = build_experts(states, torch.tensor([[1, 0], [3, 0], [0, 2]]))

    assert experts[0]["bn.num_batches_tracked"].item() == 7
    assert experts[1]["bn.num_batches_tracked"].item() == 5
    assert experts[0]["bn.num_batches_tracked"].dtype == torch.int64


def test_class_nobody_holds_gets_no_expert() -> None:
    experts = build_experts([_state(1.0, 1), _state(2.0, 1)], np.array([[2, 0, 1], [1, 0, 0]]))
    assert sorted(experts) == [0, 2]


@pytest.mark.parametrize(
    ("states", "counts"),
    [
        ([_state(1.0, 1), {"w": torch.zeros(2, 2)}], np.ones((2, 2))),
        ([_state(1.0, 1), {**_state(1.0, 1), "w": torch.zeros(3, 2)}], np.ones((2, 2))),
        ([_state(1.0, 1), _state(2.0, 1)], np.ones((3, 2))),
        ([_state(1.0, 1), _state(2.0, 1)], np.ones(2)),
    ],
    ids=["keys", "shapes", "count-rows", "count-ndim"],
)
def test_build_experts_rejects_mismatches(states: list, counts: np.ndarray) -> None:
    with pytest.raises(ValueError):
        build_experts(states, counts)


def test_ensemble_forward_equals_each_expert_run_alone() -> None:
    clients = [_trained_like_classifier(seed) for seed in range(3)]
    counts = np.array([[5, 0, 1], [1, 4, 0], [0, 0, 3]])
    experts = build_experts([c.state_dict() for c in clients], counts)
    ensemble = ExpertEnsemble(clients[0], experts)
    x = torch.randn(6, 1, 8, 8)

    logits = ensemble(x)

    assert logits.shape == (6, 3, 3)
    assert ensemble.expert_classes == [0, 1, 2]
    for index, c in enumerate(ensemble.expert_classes):
        expert = build_classifier("cnn", num_classes=3, in_shape=(1, 8, 8), width=0.25)
        expert.load_state_dict(experts[c])
        torch.testing.assert_close(logits[:, index], expert.eval()(x), atol=1e-5, rtol=1e-5)


def test_ensemble_heads_equal_each_expert_head() -> None:
    clients = [_trained_like_classifier(seed) for seed in range(2)]
    experts = build_experts([c.state_dict() for c in clients], np.array([[3, 0, 1], [1, 0, 2]]))
    ensemble = ExpertEnsemble(clients[0], experts)
    features = torch.randn(5, clients[0].feature_dim)

    logits = ensemble.heads(features)

    assert ensemble.expert_classes == [0, 2]
    for index, c in enumerate(ensemble.expert_classes):
        expected = features @ experts[c]["head.weight"].T + experts[c]["head.bias"]
        torch.testing.assert_close(logits[:, index], expected)


def test_ensemble_is_frozen_and_moves_with_to() -> None:
    client = _trained_like_classifier(0)
    ensemble = ExpertEnsemble(client, build_experts([client.state_dict()], np.ones((1, 3))))

    assert not any(p.requires_grad for p in ensemble.parameters())
    assert not ensemble.train().training
    moved = ensemble.to(torch.float64)
    assert all(b.dtype == torch.float64 for b in moved.buffers() if b.is_floating_point())
    assert moved(torch.randn(2, 1, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_prototype_bank_keeps_last_rounds() -> None:
    bank = PrototypeBank(max_rounds=2)
    bank.add(1, torch.ones(2, 4), torch.tensor([0, 1]))
    bank.add(2, torch.full((1, 4), 2.0), torch.tensor([1]))
    bank.add(2, torch.full((3, 4), 2.5), torch.tensor([0, 0, 2]))
    assert bank.rounds == [1, 2]
    assert len(bank) == 6

    bank.add(3, torch.full((1, 4), 3.0, dtype=torch.float64), torch.tensor([2], dtype=torch.int32))

    features, classes = bank.tensors()
    assert bank.rounds == [2, 3]
    assert len(bank) == 5
    assert features.dtype == torch.float32 and classes.dtype == torch.int64
    assert features.shape == (5, 4)
    assert classes.tolist() == [1, 0, 0, 2, 2]


def test_prototype_bank_rejects_inconsistent_dims() -> None:
    bank = PrototypeBank(max_rounds=3)
    bank.add(1, torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        bank.add(2, torch.zeros(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        bank.add(2, torch.zeros(2, 4), torch.tensor([0]))
    with pytest.raises(ValueError):
        bank.add(2, torch.zeros(4), torch.tensor([0]))


def test_strongest_holders_keep_every_class_witness_then_the_largest_shares() -> None:
    counts = np.array(
        [
            [90, 0, 0, 0],  # class 0's largest holder
            [10, 0, 0, 0],  # little of anything
            [0, 50, 40, 0],  # class 1's largest holder
            [0, 50, 60, 0],  # class 2's largest holder (and half of class 1)
            [0, 0, 0, 0],  # nothing
        ]
    )
    assert strongest_holders(counts, 0) == [0, 1, 2, 3, 4]  # 0: every client
    assert strongest_holders(counts, 5) == [0, 1, 2, 3, 4]
    assert strongest_holders(counts, 3) == [0, 2, 3]  # a class nobody holds needs no witness
    assert strongest_holders(counts, 2) == [0, 2]  # the witnesses of classes 0 and 1, then full
    assert strongest_holders(counts, 4) == [0, 1, 2, 3]  # then the largest summed share
