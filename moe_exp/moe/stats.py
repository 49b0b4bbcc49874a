"""Utilisation metrics from routing records, accumulated over an epoch.

Load = assignments per expert; importance = summed combine weights (Shazeer et al. 2017).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moe_exp.moe.routing import Routing


def coefficient_of_variation(x: Tensor) -> float:
    """std/mean with population std; 0 for a single expert."""
    x = x.double()
    if x.numel() <= 1 or float(x.mean()) == 0.0:
        return 0.0
    return float(x.std(unbiased=False) / x.mean())


def normalized_entropy(load: Tensor) -> float:
    """Entropy of the load distribution divided by log(E): 1 = uniform, 0 = one expert."""
    e = load.numel()
    if e <= 1:
        return 1.0
    p = load.double() / load.double().sum().clamp_min(1e-12)
    h = -(p * p.clamp_min(1e-300).log()).sum()
    return float(h / math.log(e))


def balance_metrics(load: Tensor, importance: Tensor) -> dict[str, float]:
    """Scalar balance numbers from per-expert load counts and importance sums."""
    fraction = load.double() / load.double().sum().clamp_min(1e-12)
    mean = float(fraction.mean())
    return {
        "cv_load": coefficient_of_variation(load),
        "cv_importance": coefficient_of_variation(importance),
        "max_mean_load": float(fraction.max()) / mean if mean > 0 else 0.0,
        "load_entropy": normalized_entropy(load),
    }


class RoutingStats:
    """Sums load and importance over many batches; reports fractions and balance metrics."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.load = torch.zeros(self.num_experts, dtype=torch.float64)
        self.importance = torch.zeros(self.num_experts, dtype=torch.float64)
        self.dropped = 0
        self.assignments = 0

    @torch.no_grad()
    def update(self, routing: Routing) -> None:
        self.load += routing.load().detach().double().cpu()
        self.importance += routing.importance().detach().double().cpu()
        self.dropped += routing.dropped
        self.assignments += routing.indices.numel()

    def compute(self) -> dict[str, float]:
        """Balance metrics plus per-expert ``load_e{i}`` (fraction) and ``importance_e{i}``."""
        out = balance_metrics(self.load, self.importance)
        load_frac = self.load / self.load.sum().clamp_min(1e-12)
        imp_frac = self.importance / self.importance.sum().clamp_min(1e-12)
        for i in range(self.num_experts):
            out[f"load_e{i}"] = float(load_frac[i])
            out[f"importance_e{i}"] = float(imp_frac[i])
        out["dropped_fraction"] = self.dropped / max(self.assignments, 1)
        return out
