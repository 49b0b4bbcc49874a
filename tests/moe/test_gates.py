import pytest
import torch

from moe_exp.moe import NoisyTopKGate, SoftmaxGate, TopKGate

N, D, E = 32, 8, 6


def test_softmax_gate_is_dense_and_normalised():
    gate = SoftmaxGate(D, E)
    r = gate(torch.randn(N, D))
    assert r.indices.shape == (N, E) and r.weights.shape == (N, E)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(N))
    torch.testing.assert_close(r.gates(), r.probs)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_keeps_the_k_largest_logits(k):
    gate = TopKGate(D, E, k=k)
    r = gate(torch.randn(N, D))
    assert r.indices.shape == (N, k)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(N))
    expected = r.logits.topk(k, dim=-1).indices
    assert torch.equal(r.indices.sort(-1).values, expected.sort(-1).values)
    # weights are the softmax over the kept logits only
    kept = r.logits.gather(1, r.indices)
    torch.testing.assert_close(r.weights, kept.softmax(-1))
    # gates() puts the weights at the chosen experts, zero elsewhere
    assert (r.gates() > 0).sum(-1).eq(k).all()


def test_noisy_topk_gradients_reach_router_and_noise():
    torch.manual_seed(0)
    gate = NoisyTopKGate(D, E, k=2).train()
    torch.nn.init.normal_(gate.proj.weight)
    r = gate(torch.randn(N, D))
    (r.weights.pow(2).sum() + r.smooth_load.sum()).backward()
    assert gate.proj.weight.grad.abs().sum() > 0
    assert gate.noise.weight.grad.abs().sum() > 0


def test_noisy_topk_eval_is_deterministic_and_noise_free():
    torch.manual_seed(0)
    gate = NoisyTopKGate(D, E, k=2)
    torch.nn.init.normal_(gate.proj.weight)
    gate.eval()
    x = torch.randn(N, D)
    a, b = gate(x), gate(x)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    assert torch.equal(a.indices.sort(-1).values, a.logits.topk(2).indices.sort(-1).values)


def test_noisy_topk_smooth_load_matches_hand_computation():
    """P(x,i) = Φ((clean_i − kth_excluding(noisy, k, i)) / σ_i) (Shazeer et al. 2017, app. A)."""
    gate = NoisyTopKGate(1, 3, k=1)
    clean = torch.tensor([[1.0, 0.0, -1.0]])
    noisy = torch.tensor([[0.5, 0.8, -2.0]])  # expert 1 is in the top-1
    std = torch.tensor([[1.0, 2.0, 0.5]])
    p = gate._smooth_load(clean, noisy, std)
    phi = torch.distributions.Normal(0.0, 1.0).cdf
    # expert 0 is out: threshold is the top value 0.8; expert 1 is in: threshold is 0.5;
    # expert 2 is out: threshold 0.8.
    expected = torch.stack(
        [
            phi(torch.tensor((1.0 - 0.8) / 1.0)),
            phi(torch.tensor((0.0 - 0.5) / 2.0)),
            phi(torch.tensor((-1.0 - 0.8) / 0.5)),
        ]
    ).unsqueeze(0)
    torch.testing.assert_close(p, expected)


@pytest.mark.parametrize("k", [0, 7])
def test_bad_k_is_rejected(k):
    with pytest.raises(ValueError, match="k must be in"):
        TopKGate(D, E, k=k)
