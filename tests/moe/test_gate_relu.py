import torch

from moe_exp.moe.gates.relu import ReLUGate


def _identity_gate(e, **kw):
    gate = ReLUGate(e, e, **kw)
    with torch.no_grad():
        gate.proj.weight.copy_(torch.eye(e))
        gate.proj.bias.zero_()
    return gate


def test_relu_gates_by_hand():
    gate = _identity_gate(3, k=1).eval()
    r = gate(torch.tensor([[2.0, -1.0, 0.5], [-1.0, -1.0, -1.0]]))
    assert r.indices.tolist() == [[0, -1, 2], [-1, -1, -1]]
    torch.testing.assert_close(r.weights, torch.tensor([[2.0, 0.0, 0.5], [0.0, 0.0, 0.0]]))
    assert r.experts_per_input().tolist() == [2, 0] and not r.aux_losses


def test_the_l1_coefficient_moves_towards_the_target_sparsity():
    gate = _identity_gate(4, k=1, l1_init=1.0, l1_growth=2.0).train()
    dense = torch.ones(8, 4)  # every gate positive: sparsity 0 < target 0.75
    r = gate(dense)
    torch.testing.assert_close(r.aux_losses["relu_l1"], torch.tensor(4.0))  # λ=1 · mean Σ g
    assert float(gate.l1_coefficient) == 2.0
    gate(-dense)  # every gate zero: sparsity 1 > target
    assert float(gate.l1_coefficient) == 1.0


def test_the_l1_loss_backpropagates_although_its_coefficient_adapts_in_the_same_step():
    """Found by the config property test (gate=relu through a training step): the loss must
    not hold the coefficient that the step then updates in place."""
    gate = _identity_gate(4, k=1, l1_init=1.0, l1_growth=2.0).train()
    h = torch.randn(8, 4, requires_grad=True)
    r = gate(h)
    r.aux_losses["relu_l1"].backward()
    assert h.grad is not None and float(gate.l1_coefficient) != 1.0
