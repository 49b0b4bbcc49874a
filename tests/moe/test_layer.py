import pytest
import torch
from torch import nn

from moe_exp.moe import (
    MLPExpert,
    MoE,
    NoisyTopKGate,
    Routing,
    SoftMoEGate,
    SwitchLoss,
    TopKGate,
)
from moe_exp.moe.gates import GATES as ALL_GATES
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
    with pytest.raises(ValueError, match="4 outputs but 3 experts"):
        MoE(TopKGate(D, 4, k=1), [MLPExpert((D,), C) for _ in range(3)])


# --- every gate: sparse dispatch == the dense (or einsum) reference --------------------------


def _gate(cls, **extra):
    # six experts: every gate's example arguments fit (two groups of three, for hierarchical)
    return lambda: cls(D, 6, **{**cls.example_args, **extra})


GATES = {name: _gate(cls) for name, cls in ALL_GATES.items()}
GATES["topk_capacity"] = _gate(TopKGate, k=2, capacity_factor=0.6)


def soft_reference(x, routing, experts):
    """Soft MoE written out: slots by einsum over inputs, every slot through its expert."""
    slots = torch.einsum("nes,nd->esd", routing.dispatch, x)
    outs = torch.stack(
        [
            torch.stack([experts[e](slots[e, s : s + 1])[0] for s in range(slots.shape[1])])
            for e in range(slots.shape[0])
        ]
    )  # [E, S, C]
    return torch.einsum("nes,esc->nc", routing.combine, outs)


@pytest.mark.parametrize("name", GATES)
def test_every_gate_dispatch_equals_reference_in_output_and_gradients(name):
    torch.manual_seed(0)
    gate = GATES[name]().train()
    experts = nn.ModuleList(MLPExpert((D,), C, hidden=16) for _ in range(gate.num_experts))
    x = torch.randn(N, D, requires_grad=True)
    r = gate(x)  # route once: noise, jitter and bias updates must not differ between the two
    assert name != "topk_capacity" or r.dropped > 0
    params = [x, *experts.parameters(), *gate.parameters()]

    y = dispatch_combine(x, r, experts)
    grads = torch.autograd.grad(y.square().sum(), params, retain_graph=True, allow_unused=True)
    y_ref = (soft_reference if r.is_soft else dense_reference)(x, r, experts)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), params, allow_unused=True)

    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads, grads_ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


class StackedLinear(nn.Module):
    """Grouped experts: E linear maps in one tensor (the GroupedExperts protocol)."""

    def __init__(self, num_experts, d, c):
        super().__init__()
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.randn(num_experts, d, c))

    def forward_grouped(self, x_sorted, counts):
        blocks = x_sorted.split(counts)
        return torch.cat([b @ self.weight[e] for e, b in enumerate(blocks)])


def test_soft_moe_layer_with_grouped_experts_matches_reference():
    torch.manual_seed(0)
    grouped = StackedLinear(E, D, C)
    as_list = [lambda z, w=grouped.weight[e]: z @ w for e in range(E)]
    layer = MoE(SoftMoEGate(D, E, slots_per_expert=3), grouped, transform=lambda z: z.softmax(-1))
    x = torch.randn(N, D)
    y, r = layer(x)
    ref = soft_reference(x, r, [lambda z, f=f: f(z).softmax(-1) for f in as_list])
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y.sum(-1), torch.ones(N))  # combine weights are convex


def test_soft_moe_mixes_images():
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, C)) for _ in range(2)]
    layer = MoE(SoftMoEGate(5, 2), experts)
    y, r = layer(torch.randn(6, 3, 4, 4), router_input=torch.randn(6, 5))
    assert y.shape == (6, C) and r.dispatch.shape == (6, 2, 1)


def test_soft_moe_groups_mix_only_within_a_group():
    torch.manual_seed(0)
    experts = nn.ModuleList(MLPExpert((D,), C, hidden=16) for _ in range(E))
    gate = SoftMoEGate(D, E, slots_per_expert=2, group_size=8)  # 64 inputs = 8 groups of 8
    x = torch.randn(N, D)
    r = gate(x)
    assert r.groups == 8
    torch.testing.assert_close(r.dispatch.view(8, 8, E, 2).sum(1), torch.ones(8, E, 2))
    y = dispatch_combine(x, r, experts)
    for g in range(8):  # each group alone, through the ungrouped gate, gives the same output
        part = slice(8 * g, 8 * g + 8)
        ungrouped = SoftMoEGate(D, E, slots_per_expert=2)
        ungrouped.load_state_dict(gate.state_dict())
        alone = ungrouped(x[part])
        torch.testing.assert_close(y[part], soft_reference(x[part], alone, experts))
    with pytest.raises(ValueError, match="do not split into groups of group_size=7"):
        SoftMoEGate(D, E, group_size=7)(x)
