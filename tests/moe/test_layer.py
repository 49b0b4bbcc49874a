import torch
from torch import nn

from moe_exp.moe import MLPExpert, MoE, NoisyTopKGate, Routing, SwitchLoss, TopKGate
from moe_exp.moe.layer import dispatch_combine

N, D, E, C = 64, 12, 5, 7


def dense_reference(x, routing, experts):
    """All experts on all inputs, then masked by the dense gates: the slow, obvious MoE."""
    outs = torch.stack([e(x) for e in experts], dim=1)  # [N, E, C]
    return (routing.gates().unsqueeze(-1) * outs).sum(1)


def test_sparse_dispatch_equals_dense_reference_in_output_and_gradients():
    torch.manual_seed(0)
    experts = nn.ModuleList(MLPExpert((D,), C, hidden=16) for _ in range(E))
    gate = TopKGate(D, E, k=2)
    x = torch.randn(N, D)

    r = gate(x)
    y = dispatch_combine(x, r, experts)
    grads_sparse = torch.autograd.grad(
        y.square().sum(), [*experts.parameters(), *gate.parameters()]
    )

    r = gate(x)
    y_ref = dense_reference(x, r, experts)
    grads_dense = torch.autograd.grad(
        y_ref.square().sum(), [*experts.parameters(), *gate.parameters()]
    )
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads_sparse, grads_dense, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


class CountingExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return x.sum(-1, keepdim=True)


def test_each_expert_runs_only_on_its_inputs():
    experts = [CountingExpert() for _ in range(3)]
    x = torch.ones(4, 2)
    r = Routing(
        logits=torch.zeros(4, 3),
        probs=torch.full((4, 3), 1 / 3),
        weights=torch.tensor([[0.5], [1.0], [1.0], [0.25]]),
        indices=torch.tensor([[2], [0], [2], [-1]]),  # the last assignment was dropped
        dropped=1,
    )
    y = dispatch_combine(x, r, experts)
    assert [e.seen for e in experts] == [1, 0, 2]
    torch.testing.assert_close(y, torch.tensor([[1.0], [2.0], [2.0], [0.0]]))
    assert r.dropped_fraction == 0.25
    torch.testing.assert_close(r.load(), torch.tensor([1.0, 0.0, 2.0]))


def test_moe_layer_records_weighted_aux_losses():
    torch.manual_seed(0)
    layer = MoE(
        NoisyTopKGate(D, E, k=2),
        [MLPExpert((D,), C) for _ in range(E)],
        {"switch": SwitchLoss(weight=0.5)},
    )
    y, r = layer(torch.randn(N, D))
    assert y.shape == (N, C)
    from moe_exp.moe import switch_loss

    torch.testing.assert_close(r.aux_losses["switch"], 0.5 * switch_loss(r))


def test_router_and_experts_must_agree_on_e():
    import pytest

    with pytest.raises(ValueError, match="4 outputs but 3 experts"):
        MoE(TopKGate(D, 4, k=1), [MLPExpert((D,), C) for _ in range(3)])
