import math

import pytest
import torch

from moe_exp.moe import (
    GateEntropyLoss,
    LoadEntropyLoss,
    Regularizer,
    Routing,
    ZLoss,
    cv_squared,
    gate_entropy_loss,
    importance_loss,
    load_entropy_loss,
    load_loss,
    switch_loss,
    z_loss,
)


def routing(logits, indices, weights):
    logits = torch.as_tensor(logits, dtype=torch.float32)
    return Routing(
        logits=logits,
        probs=logits.softmax(-1),
        weights=torch.as_tensor(weights, dtype=torch.float32),
        indices=torch.as_tensor(indices),
    )


def test_cv_squared_uses_population_variance():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, population variance 3.5
    torch.testing.assert_close(cv_squared(x), torch.tensor(3.5 / 9.0))
    assert cv_squared(torch.ones(5)) == 0


def test_importance_loss_on_a_hand_built_batch():
    # 3 inputs, 3 experts, top-1: gates at experts 0, 0, 2 with weights 1.
    r = routing(torch.zeros(3, 3), [[0], [0], [2]], [[1.0], [1.0], [1.0]])
    importance = torch.tensor([2.0, 0.0, 1.0])
    torch.testing.assert_close(r.importance(), importance)
    mean = 1.0
    var = ((2 - mean) ** 2 + (0 - mean) ** 2 + (1 - mean) ** 2) / 3
    torch.testing.assert_close(importance_loss(r), torch.tensor(var / mean**2))


def test_switch_loss_matches_formula():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [3.0, 0.0]])
    r = routing(logits, [[0], [1], [0], [0]], torch.ones(4, 1))
    f = torch.tensor([3 / 4, 1 / 4])
    p = logits.softmax(-1).mean(0)
    torch.testing.assert_close(switch_loss(r), 2 * (f * p).sum())


def test_losses_are_minimal_for_uniform_routing():
    # 4 inputs, 2 experts, top-1, perfectly alternating with uniform probabilities
    r = routing(torch.zeros(4, 2), [[0], [1], [0], [1]], torch.ones(4, 1))
    torch.testing.assert_close(switch_loss(r), torch.tensor(1.0))
    torch.testing.assert_close(importance_loss(r), torch.tensor(0.0))
    skewed = routing(torch.tensor([[3.0, 0.0]] * 4), [[0]] * 4, torch.ones(4, 1))
    assert switch_loss(skewed) > 1.0
    assert importance_loss(skewed) > 0.0


def test_losses_have_gradients():
    logits = torch.randn(8, 4, requires_grad=True)
    top = logits.topk(2, dim=-1)
    r = Routing(logits, logits.softmax(-1), top.values.softmax(-1), top.indices)
    (switch_loss(r) + importance_loss(r)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def with_probs(probs):
    probs = torch.as_tensor(probs, dtype=torch.float32)
    n = probs.shape[0]
    top = probs.argmax(-1, keepdim=True)
    return Routing(probs.clamp_min(1e-30).log(), probs, torch.ones(n, 1), top)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp: log 2, log 4
    r = routing(logits, [[0], [0]], torch.ones(2, 1))
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    torch.testing.assert_close(z_loss(r), torch.tensor(expected))
    # the same routing distribution at a larger logit scale costs more
    assert z_loss(routing(logits + 5, [[0], [0]], torch.ones(2, 1))) > z_loss(r)
    assert ZLoss().weight == 0.001
    torch.testing.assert_close(ZLoss()(r), z_loss(r))


def test_load_entropy_by_hand_and_minimal_when_mean_is_uniform():
    r = with_probs([[1.0, 0.0], [0.5, 0.5]])  # mean [0.75, 0.25]
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(load_entropy_loss(r), torch.tensor(-h / math.log(2)))
    torch.testing.assert_close(
        load_entropy_loss(with_probs([[1.0, 0.0], [0.0, 1.0]])), torch.tensor(-1.0)
    )
    torch.testing.assert_close(load_entropy_loss(with_probs([[1.0, 0.0]] * 2)), torch.tensor(0.0))
    torch.testing.assert_close(LoadEntropyLoss()(r), load_entropy_loss(r))


def test_gate_entropy_by_hand_and_minimal_for_one_hot_routing():
    r = with_probs([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    torch.testing.assert_close(gate_entropy_loss(r), torch.tensor(math.log(2) / 2 / math.log(3)))
    torch.testing.assert_close(gate_entropy_loss(with_probs(torch.eye(3))), torch.tensor(0.0))
    uniform = with_probs(torch.full((3, 3), 1 / 3))
    torch.testing.assert_close(gate_entropy_loss(uniform), torch.tensor(1.0))
    # the pair: uniform per input is balanced (bonus -1) but undecided (penalty 1)
    torch.testing.assert_close(load_entropy_loss(uniform), torch.tensor(-1.0))
    torch.testing.assert_close(GateEntropyLoss()(r), gate_entropy_loss(r))


def test_load_loss_uses_smooth_load_when_given():
    r = routing(torch.zeros(2, 2), [[0], [1]], torch.ones(2, 1))
    r.smooth_load = torch.tensor([[0.9, 0.2], [0.9, 0.2]])  # sums 1.8, 0.4: mean 1.1
    var = (0.7**2 + 0.7**2) / 2
    torch.testing.assert_close(load_loss(r), torch.tensor(var / 1.1**2))


def test_new_losses_have_gradients():
    logits = torch.randn(8, 4, requires_grad=True)
    top = logits.topk(2, dim=-1)
    r = Routing(logits, logits.softmax(-1), top.values.softmax(-1), top.indices)
    for loss in (z_loss, load_entropy_loss, gate_entropy_loss, load_loss):
        (g,) = torch.autograd.grad(loss(r), logits, retain_graph=True)
        assert g.abs().sum() > 0, loss.__name__


def _regularizers(cls=Regularizer):
    """Every regularizer class the library defines (subclasses of subclasses too)."""
    for sub in cls.__subclasses__():
        yield sub
        yield from _regularizers(sub)


ROUTER_LOSSES = [c for c in _regularizers() if not c.needs_experts]  # tree balance: own tests


@pytest.mark.parametrize("cls", ROUTER_LOSSES, ids=lambda c: c.__name__)
def test_every_router_loss_is_a_finite_scalar_with_gradients(cls):
    torch.manual_seed(0)
    logits = torch.randn(16, 4, requires_grad=True)
    top = logits.topk(2, dim=-1)
    r = Routing(logits, logits.softmax(-1), top.values.softmax(-1), top.indices)
    value = cls()(r)
    assert value.shape == () and torch.isfinite(value)  # entropy bonuses may be negative
    (grad,) = torch.autograd.grad(value, logits)
    assert grad.abs().sum() > 0
