"""Expert-choice routing (Zhou et al. 2022): each expert picks its top inputs."""

from __future__ import annotations

import torch
from torch import Tensor

from moe_exp.moe.gates.router import Router
from moe_exp.moe.routing import Routing, expert_capacity


class ExpertChoiceGate(Router):
    """Expert-choice routing (Zhou et al. 2022): each expert picks its top-C inputs.

    C = ceil(capacity_factor · N / E), so on average each input gets ``capacity_factor``
    experts (2 ~ top-2). Scores are the softmax over experts; an input's weight for an
    expert that chose it is that score (not renormalised), and an input no expert chose gets
    no expert at all (weight 0 everywhere; a residual path must carry it). Every expert gets
    exactly C inputs, so load is balanced by construction. ``indices`` is [N, E]: the expert
    id where it chose the input, -1 elsewhere; :meth:`Routing.experts_per_input` counts.
    The choice is over the batch, so an input's experts depend on the rest of its batch, in
    evaluation too. There is no k: ``active_experts`` is ``capacity_factor`` (the mean
    experts per input, maybe fractional).
    """

    normalised_weights = False
    example_args = {"capacity_factor": 2.0}

    def __init__(self, in_features: int, num_experts: int, capacity_factor: float = 2.0) -> None:
        super().__init__(in_features, num_experts, 1, capacity_factor)

    @property
    def active_experts(self) -> float:
        return float(self.capacity_factor)

    def forward(self, h: Tensor) -> Routing:
        logits = self.logits(h)
        probs = logits.softmax(-1)
        n, e = probs.shape
        capacity = min(n, expert_capacity(self.capacity_factor, 1, n, e))
        chosen = probs.topk(capacity, dim=0).indices  # [C, E] input ids per expert
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask.scatter_(0, chosen, True)
        experts = torch.arange(e, device=h.device).expand(n, e)
        return Routing(
            logits=logits,
            probs=probs,
            weights=probs.masked_fill(~mask, 0.0),
            indices=experts.masked_fill(~mask, -1),
            capacity=capacity,
        )
