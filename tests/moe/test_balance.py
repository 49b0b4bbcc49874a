import torch

from moe_exp.moe import Routing, cv_squared, importance_loss, switch_loss


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
