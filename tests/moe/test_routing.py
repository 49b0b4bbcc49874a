import math

import pytest
import torch

from moe_exp.moe import Routing, expert_capacity, limit_capacity


def test_expert_capacity_is_ceil_of_factor_k_n_over_e():
    assert expert_capacity(1.25, 2, 10, 4) == 7  # ceil(6.25)
    assert expert_capacity(1.0, 1, 8, 4) == 2
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        expert_capacity(0.0, 1, 8, 4)


def test_limit_capacity_serves_first_choices_first_then_input_order():
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])
    kept, w, dropped = limit_capacity(indices, weights, num_experts=3, capacity=2)
    # expert 0: first choices of inputs 0, 1 fit; input 2's first choice and input 3's second
    # choice overflow. expert 1: input 3's first choice, then input 0's second choice; input
    # 2's second choice overflows. expert 2: input 1's second choice.
    assert kept.tolist() == [[0, 1], [0, 2], [-1, -1], [1, -1]]
    torch.testing.assert_close(w, torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.0, 0.0], [0.9, 0.0]]))
    assert dropped == 3


def test_limit_capacity_ignores_already_empty_slots_and_keeps_gradients():
    indices = torch.tensor([[-1], [1], [1], [-1], [1]])
    weights = torch.rand(5, 1, requires_grad=True)
    kept, w, dropped = limit_capacity(indices, weights, num_experts=2, capacity=2)
    assert kept.view(-1).tolist() == [-1, 1, 1, -1, -1] and dropped == 1
    w.sum().backward()
    assert weights.grad.view(-1).tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]


def test_limit_capacity_is_a_no_op_when_everything_fits():
    indices = torch.randint(0, 4, (16, 2))
    weights = torch.rand(16, 2)
    kept, w, dropped = limit_capacity(indices, weights, 4, capacity=32)
    assert kept is indices and w is weights and dropped == 0


def test_routing_counts_experts_per_input_and_soft_load():
    r = Routing(
        logits=torch.zeros(3, 3),
        probs=torch.full((3, 3), 1 / 3),
        weights=torch.tensor([[0.5, 0.2, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.4]]),
        indices=torch.tensor([[0, 1, -1], [-1, -1, -1], [-1, -1, 2]]),
    )
    assert r.experts_per_input().tolist() == [2, 0, 1]
    assert r.load().tolist() == [1.0, 1.0, 1.0] and not r.is_soft
    combine = torch.tensor([[[0.5, 0.2], [0.3, 0.0]], [[0.1, 0.1], [0.4, 0.4]]])  # [N=2, E=2, S=2]
    soft = Routing(
        logits=torch.zeros(2, 2),
        probs=combine.sum(-1),
        weights=combine.sum(-1),
        indices=torch.arange(2).expand(2, 2),
        dispatch=combine.softmax(0),
        combine=combine,
    )
    assert soft.is_soft
    torch.testing.assert_close(soft.load(), torch.tensor([0.7 + 0.2, 0.3 + 0.8]))
    torch.testing.assert_close(soft.load_fraction().sum(), torch.tensor(1.0))
    assert math.isclose(float(soft.importance()[0]), 0.9, rel_tol=1e-6)


def test_load_counts_exactly_under_low_precision_logits():
    """bf16 has 8 significant bits: 447 assignments must not read as 448."""
    indices = torch.cat([torch.zeros(447), torch.ones(554)]).long().unsqueeze(1)
    logits = torch.zeros(1001, 2, dtype=torch.bfloat16)
    r = Routing(
        logits=logits, probs=logits.softmax(-1), weights=torch.ones(1001, 1), indices=indices
    )
    assert r.load().tolist() == [447.0, 554.0]
