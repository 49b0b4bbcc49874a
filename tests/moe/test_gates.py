import inspect
import math
import warnings

import pytest
import torch

from moe_exp.moe import (
    BASEGate,
    BiasBalancedGate,
    CosineGate,
    ExpertChoiceGate,
    HashGate,
    HierarchicalGate,
    NoisyTopKGate,
    SoftmaxGate,
    SoftMoEGate,
    SwitchGate,
    TopKGate,
)
from moe_exp.moe.gates import GATES, Router
from moe_exp.moe.gates.base_layers import balanced_assignment, sinkhorn_assignment

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
    with pytest.raises(ValueError, match=f"k={k} must be (>= 1|<= experts={E})"):
        TopKGate(D, E, k=k)


# --- every router -------------------------------------------------------------------------


def make(name):
    """The gate as its class declares a test should build it. All-zero weight matrices are
    redrawn: a gate that starts at zero (noisy top-k) would otherwise route by noise alone."""
    torch.manual_seed(0)
    gate = GATES[name](D, E, **GATES[name].example_args)
    with torch.no_grad():
        for p in gate.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_()
    return gate


@pytest.mark.parametrize("name", GATES)
def test_router_record_shapes_and_weights(name):
    r = make(name).train()(torch.randn(N, D))
    k = r.k
    assert r.logits.shape == r.probs.shape == (N, E)
    assert r.indices.shape == r.weights.shape == (N, k) and r.indices.dtype == torch.long
    assert r.indices.min() >= -1 and r.indices.max() < E
    assert (r.weights >= 0).all()
    if GATES[name].unit_weights:
        assert (r.weights <= 1 + 1e-6).all()
    assert (r.weights[r.indices < 0] == 0).all()
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(N))
    if GATES[name].normalised_weights:
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(N))
    kept = r.indices.masked_fill(r.indices < 0, E)  # an expert appears at most once per input
    assert all(len(set(row) - {E}) == sum(v != E for v in row) for row in kept.tolist())


@pytest.mark.parametrize("name", [n for n, cls in GATES.items() if cls.picks_top_logits])
def test_evaluation_keeps_the_k_largest_logits(name):
    r = make(name).eval()(torch.randn(N, D))
    expected = r.logits.topk(r.k, dim=-1).indices
    assert torch.equal(r.indices.sort(-1).values, expected.sort(-1).values)


@pytest.mark.parametrize("name", GATES)
def test_gradients_reach_every_router_parameter(name):
    gate = make(name).train()
    r = gate(torch.randn(N, D))
    coef = torch.randn_like(r.weights)
    loss = (coef * r.weights).sum()
    if r.dispatch is not None:
        loss = loss + (torch.randn_like(r.dispatch) * r.dispatch).sum()
    params = dict(gate.named_parameters())
    if not params:  # routing that ignores learning (hash) passes no gradient either
        assert not r.weights.requires_grad
        return
    grads = torch.autograd.grad(loss, list(params.values()))
    for (pname, _), g in zip(params.items(), grads, strict=True):
        assert g.abs().sum() > 0, f"no gradient reached {pname}"


@pytest.mark.parametrize("name", GATES)
def test_eval_routing_is_deterministic(name):
    gate = make(name)
    x = torch.randn(N, D)
    gate.train()(x)  # hash: sets the centre; bias_balanced: moves the bias once
    gate.eval()
    buffers = {n: b.clone() for n, b in gate.named_buffers()}
    a, b = gate(x), gate(x)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    for n, buf in gate.named_buffers():
        assert torch.equal(buf, buffers[n]), f"buffer {n} changed in eval"


def _limits_capacity(cls):
    """Gates whose ``capacity_factor`` caps the assignments per expert (expert choice reads it
    as the experts per input instead)."""
    takes = "capacity_factor" in inspect.signature(cls).parameters
    return takes and cls.active_experts is Router.active_experts


@pytest.mark.parametrize("name", [n for n, cls in GATES.items() if _limits_capacity(cls)])
def test_capacity_limit_drops_and_counts(name):
    """The training limit applies in training only; evaluation has its own (none by default)."""
    gate = make(name)
    gate.capacity_factor = 0.5
    h = torch.randn(N, D)
    unlimited = gate.eval()(h)
    assert unlimited.capacity is None and unlimited.dropped == 0
    gate.eval_capacity_factor = 0.25
    for mode, factor in ((gate.train, 0.5), (gate.eval, 0.25)):
        torch.manual_seed(0)
        r = mode()(h)
        capacity = math.ceil(factor * r.k * N / E)
        assert r.capacity == capacity and (r.load() <= capacity).all()
        assert r.dropped == N * r.k - int(r.load().sum()) > 0
        assert r.dropped_fraction == r.dropped / (N * r.k)


def test_capacity_drops_by_hand_with_topk():
    gate = TopKGate(3, 3, k=1, capacity_factor=0.75)  # capacity ceil(0.75·1·4/3) = 1
    identity(gate.proj)
    h = torch.tensor([[3.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]])
    r = gate(h)
    assert r.indices.view(-1).tolist() == [0, -1, 1, -1] and r.dropped == 2
    assert r.weights.view(-1).tolist() == [1.0, 0.0, 1.0, 0.0]


def identity(linear):
    with torch.no_grad():
        linear.weight.copy_(torch.eye(linear.out_features, linear.in_features))
        if linear.bias is not None:
            linear.bias.zero_()


# --- switch ---------------------------------------------------------------------------------


def test_switch_is_top1_weighted_by_router_probability():
    gate = SwitchGate(D, E).eval()
    x = torch.randn(N, D)
    r = gate(x)
    torch.testing.assert_close(r.logits, gate.proj(x))
    assert torch.equal(r.indices[:, 0], r.logits.argmax(-1))
    torch.testing.assert_close(r.weights[:, 0], r.logits.softmax(-1).max(-1).values)


def test_switch_jitters_the_router_input_in_training_only():
    x = torch.randn(N, D)
    torch.manual_seed(0)
    gate = SwitchGate(D, E, jitter=0.1).train()
    torch.manual_seed(1)
    jittered = gate(x).logits
    torch.manual_seed(1)
    noise = torch.empty_like(x).uniform_(0.9, 1.1)
    torch.testing.assert_close(jittered, gate.proj(x * noise))
    assert not torch.allclose(jittered, gate.proj(x))
    torch.testing.assert_close(gate.eval()(x).logits, gate.proj(x))


def test_switch_router_runs_in_float32_under_autocast():
    gate = SwitchGate(D, E)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = gate(torch.randn(N, D).bfloat16())
    assert r.logits.dtype == r.weights.dtype == torch.float32


# --- expert choice --------------------------------------------------------------------------


def test_expert_choice_each_expert_takes_exactly_c_inputs():
    r = ExpertChoiceGate(D, E, capacity_factor=2.0)(torch.randn(N, D))
    c = math.ceil(2.0 * N / E)  # 11
    assert r.capacity == c and r.load().tolist() == [float(c)] * E
    assert int(r.experts_per_input().sum()) == c * E and r.dropped == 0


def test_expert_choice_by_hand():
    gate = ExpertChoiceGate(3, 3, capacity_factor=1.0)  # C = ceil(1·3/3) = 1
    identity(gate.proj)
    h = torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    p = h.softmax(-1)  # experts 0 and 1 both prefer input 0; expert 2 prefers input 2
    r = gate(h)
    assert r.indices.tolist() == [[0, 1, -1], [-1, -1, -1], [-1, -1, 2]]
    assert r.experts_per_input().tolist() == [2, 0, 1]
    expected = torch.zeros(3, 3)
    expected[0, :2], expected[2, 2] = p[0, :2], p[2, 2]
    torch.testing.assert_close(r.weights, expected)


# --- soft MoE -------------------------------------------------------------------------------


def test_soft_moe_dispatch_and_combine_by_hand():
    gate = SoftMoEGate(2, 2, slots_per_expert=1)
    identity(gate.proj)  # slot logits = h
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    r = gate(h)
    e = h.exp()
    torch.testing.assert_close(r.dispatch[..., 0], e / e.sum(0, keepdim=True))  # over inputs
    torch.testing.assert_close(r.combine[..., 0], e / e.sum(1, keepdim=True))  # over slots
    torch.testing.assert_close(r.probs, r.logits.softmax(-1))
    torch.testing.assert_close(r.load(), r.combine.sum((0, 2)))
    assert r.is_soft and r.indices.tolist() == [[0, 1]] * 3


# --- hash -----------------------------------------------------------------------------------


def test_hash_routing_is_a_fixed_seeded_projection_of_the_centred_input():
    a, b, c = HashGate(D, E, k=2, seed=3), HashGate(D, E, seed=3), HashGate(D, E, seed=4)
    assert not list(a.parameters())
    assert torch.equal(a.projection, b.projection) and not torch.equal(a.projection, c.projection)
    x = torch.randn(N, D, requires_grad=True) + 5.0
    r = a.train()(x)
    torch.testing.assert_close(a.center, x.detach().mean(0))  # first batch sets the centre
    scores = (x.detach() - x.detach().mean(0)) @ a.projection
    assert torch.equal(r.indices, scores.topk(2).indices)
    assert (r.weights == 0.5).all() and not r.logits.requires_grad


# --- BASE -----------------------------------------------------------------------------------


@pytest.mark.parametrize("assignment", ["sinkhorn", "exact"])
def test_base_training_gives_every_expert_exactly_n_over_e_inputs(assignment):
    gate = BASEGate(D, 4, assignment=assignment).train()
    torch.nn.init.normal_(gate.proj.weight, std=3.0)  # skewed scores: greedy would not balance
    r = gate(torch.randn(32, D))
    assert r.load().tolist() == [8.0] * 4
    torch.testing.assert_close(r.weights, r.logits.gather(1, r.indices).sigmoid())


def test_base_assignment_is_the_best_balanced_one():
    from itertools import permutations

    scores = torch.tensor([[5.0, 4.0], [4.0, 0.0], [3.0, 1.0], [0.0, 2.0]])
    best = max(
        set(permutations([0, 0, 1, 1])),
        key=lambda a: sum(float(scores[i, e]) for i, e in enumerate(a)),
    )  # (1, 0, 0, 1): input 0 yields expert 0 to inputs 1 and 2
    assert tuple(balanced_assignment(scores).tolist()) == best == (1, 0, 0, 1)


def test_sinkhorn_assignment_caps_every_expert_and_comes_within_1pc_of_the_best():
    torch.manual_seed(0)
    scores = 2 * torch.randn(300, 7)  # 7 does not divide 300: at most 43 per expert
    experts = sinkhorn_assignment(scores)
    assert (experts >= 0).all() and torch.bincount(experts, minlength=7).max() == 43
    total = scores.gather(1, experts[:, None]).sum()
    best = scores.gather(1, balanced_assignment(scores)[:, None]).sum()
    assert 0.99 * best <= total <= best
    hand = torch.tensor([[5.0, 4.0], [4.0, 0.0], [3.0, 1.0], [0.0, 2.0]])
    assert tuple(sinkhorn_assignment(hand).tolist()) == (1, 0, 0, 1)  # as the exact one


def test_base_rejects_an_unknown_assignment_naming_the_choices():
    with pytest.raises(ValueError, match="assignment='auction' is not one of sinkhorn, exact"):
        BASEGate(D, E, assignment="auction")


def test_base_evaluation_is_greedy_top1():
    gate = BASEGate(D, E, weighting="softmax").eval()
    r = gate(torch.randn(N, D))
    assert torch.equal(r.indices[:, 0], r.logits.argmax(-1))
    torch.testing.assert_close(r.weights[:, 0], r.probs.max(-1).values)


# --- bias-balanced (aux-loss-free) ----------------------------------------------------------


def test_bias_moves_by_gamma_sign_after_a_training_forward_and_freezes_in_eval():
    gate = BiasBalancedGate(4, 4, k=1, bias_update_rate=0.1)
    identity(gate.proj)
    h = torch.tensor([[3.0, 0, 0, 0], [2.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    r = gate.train()(h)  # loads [3, 1, 0, 0], mean 1 -> sign(mean - load) = [-1, 0, 1, 1]
    assert r.indices.view(-1).tolist() == [0, 0, 0, 1]
    torch.testing.assert_close(gate.bias, torch.tensor([-0.1, 0.0, 0.1, 0.1]))
    gate.eval()(h)
    torch.testing.assert_close(gate.bias, torch.tensor([-0.1, 0.0, 0.1, 0.1]))
    gate.update_bias(r)  # the explicit update, same rule
    torch.testing.assert_close(gate.bias, torch.tensor([-0.2, 0.0, 0.2, 0.2]))


def test_bias_selects_but_unbiased_scores_weigh():
    gate = BiasBalancedGate(3, 3, k=2, update_in_forward=False).train()
    identity(gate.proj)
    gate.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
    h = torch.tensor([[2.0, 1.0, -1.0]])
    r = gate(h)
    assert sorted(r.indices.view(-1).tolist()) == [0, 2]
    s = h.sigmoid()[0]
    torch.testing.assert_close(r.weights.view(-1), torch.stack([s[2], s[0]]) / (s[0] + s[2]))
    assert torch.equal(gate.bias, torch.tensor([0.0, 0.0, 10.0]))  # no update asked for


# --- cosine ---------------------------------------------------------------------------------


def test_cosine_logits_by_hand_and_temperature_clamp():
    gate = CosineGate(2, 3, k=1, dim=2, temperature=0.5)
    identity(gate.proj)
    with torch.no_grad():
        gate.expert_embeddings.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]))
    r = gate(torch.tensor([[4.0, 0.0]]))
    torch.testing.assert_close(r.logits, torch.tensor([[1.0, 0.0, 2**-0.5]]) / 0.5)
    with torch.no_grad():
        gate.temperature.fill_(1e-4)
    assert gate(torch.randn(5, 2)).logits.abs().max() <= 1 / gate.min_temperature + 1e-3


# --- hierarchical ---------------------------------------------------------------------------


def test_hierarchical_weight_is_product_of_levels():
    gate = HierarchicalGate(D, E, k=2, num_groups=3, k_group=2)  # 3 groups of 2 experts
    x = torch.randn(N, D)
    r = gate(x)
    gl, el = gate.group_proj(x), gate.proj(x).view(N, 3, 2)
    for n in range(4):
        top = gl[n].topk(2)
        gw = top.values.softmax(-1)
        for g, w in zip(top.indices.tolist(), gw, strict=True):
            ew = el[n, g].softmax(-1)  # k = 2 of 2: both experts of the group, softmax
            for e in range(2):
                j = r.indices[n].tolist().index(2 * g + e)
                torch.testing.assert_close(r.weights[n, j], w * ew[e])
    assert r.k == gate.k == 4
    p = gl.softmax(-1).unsqueeze(-1) * el.softmax(-1)
    torch.testing.assert_close(r.probs, p.flatten(1))


def test_hierarchical_rejects_groups_that_do_not_divide_experts():
    with pytest.raises(ValueError, match=r"num_groups=4 must divide experts=6 \(allowed: 1, 2"):
        HierarchicalGate(D, 6, num_groups=4)


def test_top_1_with_renormalised_weights_warns_and_the_task_gives_the_router_no_gradient():
    with pytest.warns(UserWarning, match="no gradient from the task loss"):
        gate = TopKGate(8, 4, k=1)
    routing = gate(torch.randn(16, 8))
    (routing.weights * torch.randn(16, 1)).sum().backward()
    assert torch.all(routing.weights == 1) and torch.all(gate.proj.weight.grad == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        switch = SwitchGate(8, 4)  # top-1 that weights by p_i: no warning, a real gradient
    routing = switch(torch.randn(16, 8))
    (routing.weights * torch.randn(16, 1)).sum().backward()
    assert switch.proj.weight.grad.abs().sum() > 0


def test_hierarchical_log_probs_are_its_two_level_probs_not_a_softmax_of_logits():
    """Losses on the router's distribution (EM, staged gate training) read log_probs()."""
    torch.manual_seed(7)
    r = HierarchicalGate(D, 4, k=2, num_groups=2, k_group=2)(torch.randn(N, D))
    torch.testing.assert_close(r.log_probs().exp(), r.probs)
    assert not torch.allclose(r.log_probs(), r.logits.log_softmax(-1), atol=1e-3)
