import math

import torch

from moe_exp.moe import Routing, RoutingStats, balance_metrics
from moe_exp.moe.stats import (
    coefficient_of_variation,
    gate_entropy,
    linear_cka,
    normalized_entropy,
    normalized_mutual_information,
)


def top1(indices, e):
    idx = torch.tensor(indices).view(-1, 1)
    n = idx.shape[0]
    return Routing(torch.zeros(n, e), torch.full((n, e), 1 / e), torch.ones(n, 1), idx)


def test_balance_metrics_by_hand():
    load = torch.tensor([6.0, 2.0, 0.0, 0.0])
    m = balance_metrics(load, torch.tensor([1.0, 1.0, 1.0, 1.0]))
    frac = [0.75, 0.25, 0.0, 0.0]
    mean = 0.25
    std = math.sqrt(sum((f - mean) ** 2 for f in frac) / 4)
    assert math.isclose(m["cv_load"], std / mean, rel_tol=1e-9)
    assert m["cv_importance"] == 0.0
    assert math.isclose(m["max_mean_load"], 3.0)
    assert math.isclose(m["max_vio"], 2.0)  # (6 − 2) / 2
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4)
    assert math.isclose(m["load_entropy"], h, rel_tol=1e-9)
    assert m["dead_experts"] == 2.0 and m["dead_experts_load"] == 2.0
    assert m["dead_experts_weight"] == 0.0 and math.isclose(m["effective_experts"], 4.0)
    assert math.isclose(m["effective_experts_load"], math.exp(h * math.log(4)), rel_tol=1e-9)


def test_balanced_load_with_idle_weight_is_caught():
    """Every expert gets a quarter of the inputs, but two are only ever a near-zero second
    choice: load says balanced, weight says two experts do nothing."""
    e, n = 4, 400
    first = torch.arange(n) % 2  # experts 0 and 1 hold the weight
    second = first + 2  # experts 2 and 3 are everyone's second choice
    indices = torch.stack([first, second], 1)
    weights = torch.tensor([[0.999, 0.001]]).repeat(n, 1)
    routing = Routing(torch.zeros(n, e), torch.full((n, e), 1 / e), weights, indices)
    stats = RoutingStats(e)
    stats.update(routing)
    m = stats.compute()
    assert m["cv_load"] == 0.0 and m["dead_experts_load"] == 0.0
    assert math.isclose(m["effective_experts_load"], 4.0, rel_tol=1e-9)
    assert m["dead_experts_weight"] == 2.0 and m["dead_experts"] == 2.0
    assert 2.0 < m["effective_experts"] < 2.02  # two experts' worth of work


def test_balanced_weight_with_skewed_load_is_caught():
    """Dense weights spread evenly, but the top-1 assignments all go to expert 0."""
    m = balance_metrics(torch.tensor([100.0, 0, 0, 0]), torch.full((4,), 25.0))
    assert m["dead_experts_load"] == 3.0 and m["dead_experts_weight"] == 0.0
    assert math.isclose(m["effective_experts_load"], 1.0)
    assert math.isclose(m["effective_experts"], 4.0) and m["dead_experts"] == 3.0


def test_extremes():
    assert normalized_entropy(torch.ones(8)) == 1.0
    assert normalized_entropy(torch.tensor([5.0, 0, 0])) == 0.0
    assert coefficient_of_variation(torch.tensor([3.0])) == 0.0
    assert balance_metrics(torch.ones(4), torch.ones(4))["max_vio"] == 0.0


def test_nmi_perfect_specialisation_is_one_and_random_is_near_zero():
    perfect = torch.diag(torch.tensor([10.0, 20.0, 30.0]))
    assert math.isclose(normalized_mutual_information(perfect), 1.0, rel_tol=1e-9)
    # independent routing: the joint is the product of its marginals
    independent = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 1.0]))
    assert abs(normalized_mutual_information(independent)) < 1e-9
    g = torch.Generator().manual_seed(0)
    expert = torch.randint(0, 4, (20000,), generator=g)
    label = torch.randint(0, 10, (20000,), generator=g)
    joint = torch.zeros(4, 10).index_put_((expert, label), torch.ones(20000), accumulate=True)
    assert normalized_mutual_information(joint) < 0.005


def test_nmi_by_hand():
    # 2 experts × 2 labels: p = [[0.4, 0.1], [0.1, 0.4]]
    joint = torch.tensor([[4.0, 1.0], [1.0, 4.0]])
    p = [[0.4, 0.1], [0.1, 0.4]]
    mi = sum(p[i][j] * math.log(p[i][j] / 0.25) for i in range(2) for j in range(2))
    assert math.isclose(normalized_mutual_information(joint), mi / math.log(2), rel_tol=1e-9)


def test_gate_entropy_and_cka():
    uniform = torch.full((3, 4), 0.25)
    torch.testing.assert_close(gate_entropy(uniform), torch.ones(3, dtype=torch.float64))
    onehot = torch.eye(4)[:3]
    assert gate_entropy(onehot).abs().max() < 1e-12
    x = torch.randn(200, 8)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert math.isclose(linear_cka(x, 3 * x @ q), 1.0, rel_tol=1e-6)
    assert linear_cka(x, torch.randn(200, 8)) < 0.2


def test_routing_stats_accumulate_over_batches():
    stats = RoutingStats(2, num_classes=2, latents={"colour": (1, 3)})
    latents = torch.tensor([[0.0, 2.0], [0.0, 1.0]])
    stats.update(top1([0, 0], 2), labels=torch.tensor([1, 1]), latents=latents)
    stats.update(top1([1, 0], 2), labels=torch.tensor([0, 1]), latents=latents)
    out = stats.compute()
    assert out["load_e0"] == 0.75 and out["load_e1"] == 0.25
    assert math.isclose(out["max_mean_load"], 1.5)
    assert out["experts_per_input"] == 1.0 and out["unrouted_fraction"] == 0.0
    # expert 0 saw label 1 three times, expert 1 saw label 0 once: perfectly specialised
    assert math.isclose(out["nmi_label"], 1.0)
    torch.testing.assert_close(
        stats.latent_mass["colour"], torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, 1.0]]).double()
    )
    stats.reset()
    assert stats.load.sum() == 0 and stats.class_mass.sum() == 0


def test_token_routing_repeats_image_labels():
    stats = RoutingStats(2, num_classes=2)
    # 2 images × 2 tokens: image 0's tokens go to expert 0, image 1's to expert 1
    stats.update(top1([0, 0, 1, 1], 2), labels=torch.tensor([0, 1]))
    assert math.isclose(stats.compute()["nmi_label"], 1.0)


def test_unrouted_inputs_are_counted():
    r = Routing(
        torch.zeros(3, 2),
        torch.full((3, 2), 0.5),
        torch.ones(3, 2) * 0.5,
        torch.tensor([[0, 1], [0, -1], [-1, -1]]),
    )
    stats = RoutingStats(2)
    stats.update(r)
    out = stats.compute()
    assert math.isclose(out["experts_per_input"], 1.0) and math.isclose(
        out["unrouted_fraction"], 1 / 3
    )


def test_per_expert_accuracy_on_routed_inputs():
    r = top1([0, 1, 1, 0], 2)
    # expert 0 got inputs 0 and 3, expert 1 inputs 1 and 2; their own predictions:
    r.expert_predictions = (
        torch.tensor([0, 3, 1, 2]),
        torch.tensor([0, 0, 1, 1]),
        torch.tensor([5, 2, 1, 3]),
    )
    stats = RoutingStats(2, num_classes=6)
    stats.update(r, labels=torch.tensor([5, 1, 0, 2]))
    out = stats.compute()
    assert out["acc_e0"] == 1.0  # predicted 5 for label 5, 2 for label 2
    assert out["acc_e1"] == 0.5  # right on input 1 (label 1), wrong on input 2 (label 0)


def _assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert math.isclose(got[key], value, rel_tol=1e-12, abs_tol=1e-12), key


def test_queued_batches_sum_to_what_batch_by_batch_sums_give():
    """The statistics queue batches and sum them together; the result is the same as
    summing each batch as it comes, expert predictions and latents included, and a read
    in the middle (compute) sees every batch so far."""
    torch.manual_seed(0)
    e, classes = 4, 3
    batches = []
    for n in (5, 7, 1, 6, 5):
        logits = torch.randn(n, e)
        probs = logits.softmax(-1)
        weights, indices = probs.topk(2, -1)
        indices[0, 1] = -1  # a dropped assignment
        rows = torch.arange(n).repeat_interleave(2)[indices.reshape(-1) >= 0]
        experts = indices.reshape(-1)[indices.reshape(-1) >= 0]
        routing = Routing(logits, probs, weights, indices, dropped=1)
        routing.expert_predictions = (rows, experts, torch.randint(classes, (rows.numel(),)))
        batches.append((routing, torch.randint(classes, (n,)), torch.randint(2, (n, 2)).float()))
    latents = {"colour": (1, 2)}
    one_by_one = RoutingStats(e, classes, latents)
    one_by_one.FLUSH_EVERY = 1
    queued = RoutingStats(e, classes, latents)
    queued.FLUSH_EVERY = 3
    for i, (routing, y, z) in enumerate(batches):
        one_by_one.update(routing, y, z)
        queued.update(routing, y, z)
        if i == 3:
            _assert_same(queued.compute(), one_by_one.compute())
    expected, got = one_by_one.compute(), queued.compute()
    _assert_same(got, expected)
    torch.testing.assert_close(
        queued.host().latent_mass["colour"], one_by_one.latent_mass["colour"]
    )
    torch.testing.assert_close(
        torch.cat(queued.gate_entropies), torch.cat(one_by_one.gate_entropies)
    )
    assert got["dropped_fraction"] == 5 / sum(2 * r.weights.shape[0] for r, _, _ in batches)


def test_the_queue_holds_no_autograd_graph():
    logits = torch.randn(4, 2, requires_grad=True)
    probs = logits.softmax(-1)
    weights, indices = probs.topk(1, -1)
    stats = RoutingStats(2)
    stats.update(Routing(logits, probs, weights, indices))
    ((queued, _, _),) = stats._queued
    assert not any(t.requires_grad for t in (queued.logits, queued.probs, queued.weights))
