"""ReLU routing (ReMoE, Wang et al. 2024, ICLR 2025): a ReLU gate, sparsity by an adaptive L1."""

from __future__ import annotations

import torch
from torch import Tensor

from moe_exp.moe.gates.router import Router
from moe_exp.moe.routing import Routing


class ReLUGate(Router):
    """g = ReLU(h·W): every expert with a positive gate runs, weighted by it (unnormalised).

    The number of experts per input is learned, not fixed. Sparsity comes from an L1 penalty
    λ_t · mean_x Σ_i g_i(x), returned with the record as the aux loss ``relu_l1``, whose
    coefficient adapts each training step towards the target sparsity 1 − k/E:
    λ_{t+1} = λ_t · α^{sign(target − sparsity_t)}, α = ``l1_growth`` (paper: 1.2), λ_0 =
    ``l1_init`` (paper: 1e-8), sparsity_t the fraction of zero gates in the batch. So k here
    is the mean experts per input the control aims at. ``indices`` is [N, E] (the expert id
    where its gate is positive, -1 elsewhere), as for expert choice. The paper's
    load-balancing refinement of the penalty is left out (the balance regularizers apply).
    """

    normalised_weights = False
    unit_weights = False
    example_args = {"k": 2}

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 2,
        l1_init: float = 1e-8,
        l1_growth: float = 1.2,
    ) -> None:
        super().__init__(in_features, num_experts, k)
        if l1_init <= 0 or l1_growth < 1:
            raise ValueError(f"l1_init={l1_init} must be > 0 and l1_growth={l1_growth} >= 1")
        self.l1_growth = l1_growth
        self.register_buffer("l1_coefficient", torch.tensor(float(l1_init)))

    def forward(self, h: Tensor) -> Routing:
        logits = self.logits(h)
        gates = logits.relu()
        active = gates > 0
        experts = torch.arange(self.num_experts, device=h.device).expand_as(gates)
        routing = Routing(
            logits=logits,
            probs=logits.softmax(-1),
            weights=gates,
            indices=experts.masked_fill(~active, -1),
        )
        if self.training:
            # a copy: the coefficient adapts in place below, after the loss has used it
            coefficient = self.l1_coefficient.clone()
            routing.aux_losses["relu_l1"] = coefficient * gates.sum(-1).mean()
            self._adapt(active)
        return routing

    @torch.no_grad()
    def _adapt(self, active: Tensor) -> None:
        """λ grows while the gates are denser than the target, shrinks while sparser."""
        sparsity = 1.0 - active.float().mean()
        target = 1.0 - self.k / self.num_experts
        self.l1_coefficient *= self.l1_growth ** torch.sign(target - sparsity)
