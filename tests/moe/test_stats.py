import math

import torch

from moe_exp.moe import Routing, RoutingStats, balance_metrics
from moe_exp.moe.stats import coefficient_of_variation, normalized_entropy


def test_balance_metrics_by_hand():
    load = torch.tensor([6.0, 2.0, 0.0, 0.0])
    m = balance_metrics(load, torch.tensor([1.0, 1.0, 1.0, 1.0]))
    frac = [0.75, 0.25, 0.0, 0.0]
    mean = 0.25
    std = math.sqrt(sum((f - mean) ** 2 for f in frac) / 4)
    assert math.isclose(m["cv_load"], std / mean, rel_tol=1e-9)
    assert m["cv_importance"] == 0.0
    assert math.isclose(m["max_mean_load"], 3.0)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4)
    assert math.isclose(m["load_entropy"], h, rel_tol=1e-9)


def test_extremes():
    assert normalized_entropy(torch.ones(8)) == 1.0
    assert normalized_entropy(torch.tensor([5.0, 0, 0])) == 0.0
    assert coefficient_of_variation(torch.tensor([3.0])) == 0.0


def test_routing_stats_accumulate_over_batches():
    stats = RoutingStats(2)
    for idx in ([[0], [0]], [[1], [0]]):
        idx = torch.tensor(idx)
        stats.update(Routing(torch.zeros(2, 2), torch.full((2, 2), 0.5), torch.ones(2, 1), idx))
    out = stats.compute()
    assert out["load_e0"] == 0.75 and out["load_e1"] == 0.25
    assert math.isclose(out["max_mean_load"], 1.5)
    stats.reset()
    assert stats.load.sum() == 0
