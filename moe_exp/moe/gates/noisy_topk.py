"""Noisy top-k gating (Shazeer et al. 2017): learned noise before top-k, in training only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_exp.moe.gates.router import top_k_routing
from moe_exp.moe.gates.topk import TopKGate
from moe_exp.moe.routing import Routing


class NoisyTopKGate(TopKGate):
    """Noisy top-k gating (Shazeer et al. 2017, "Outrageously large neural networks", eq. 3-5).

    H(x)_i = (x·W_g)_i + ε·softplus((x·W_noise)_i), ε ~ N(0, 1), during training only;
    G(x) = softmax(KeepTopK(H(x), k)). Both projections start at zero, as in the paper, so
    early routing is pure noise and every expert gets inputs. The record also carries the
    smooth load estimator P(x, i) = Φ(((x·W_g)_i − kth_excluding(H(x), k, i)) / σ_i(x))
    (paper appendix A), which the load loss differentiates.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 2,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
    ) -> None:
        super().__init__(
            in_features, num_experts, k, capacity_factor, eval_capacity_factor=eval_capacity_factor
        )
        self.noise = nn.Linear(in_features, num_experts)
        for layer in (self.proj, self.noise):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: Tensor) -> Routing:
        if not self.training:
            return super().forward(h)  # plain top-k on the clean logits
        clean = self.logits(h)
        std = F.softplus(self.noise(h)) + 1e-2  # floor: keeps the Φ argument finite
        noisy = clean + torch.randn_like(clean) * std
        weights, indices = top_k_routing(noisy, self.k)
        smooth_load = self._smooth_load(clean, noisy, std)
        return self._route(clean, clean.softmax(-1), weights, indices, smooth_load=smooth_load)

    def _smooth_load(self, clean: Tensor, noisy: Tensor, std: Tensor) -> Tensor:
        """P(x, i): probability that expert i stays in the top k when only its noise is redrawn."""
        if self.k >= self.num_experts:
            return torch.ones_like(clean)
        top = noisy.topk(self.k + 1, dim=-1).values
        threshold_if_in = top[:, self.k : self.k + 1]  # k-th largest of the others when i is in
        threshold_if_out = top[:, self.k - 1 : self.k]  # k-th largest overall when i is out
        is_in = noisy > threshold_if_in
        threshold = torch.where(is_in, threshold_if_in, threshold_if_out)
        # Φ via ndtr: no argument validation, so a diverging run reaches the loss check as NaN
        return torch.special.ndtr((clean - threshold) / std)
