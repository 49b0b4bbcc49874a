"""Dense softmax gating (Jacobs, Jordan, Nowlan & Hinton 1991): every expert, every input."""

from __future__ import annotations

import torch
from torch import Tensor

from moe_exp.moe.gates.router import Router
from moe_exp.moe.routing import Routing


class SoftmaxGate(Router):
    """Dense softmax gating: every expert runs on every input, weighted by softmax(h·W).

    Jacobs, Jordan, Nowlan & Hinton (1991), "Adaptive mixtures of local experts".
    ``k`` is accepted for a uniform signature and ignored: a dense gate uses all experts.
    """

    def __init__(self, in_features: int, num_experts: int, k: int | None = None) -> None:
        super().__init__(in_features, num_experts, k=num_experts)

    def forward(self, h: Tensor) -> Routing:
        logits = self.logits(h)
        probs = logits.softmax(-1)
        indices = torch.arange(self.num_experts, device=h.device).expand(h.shape[0], -1)
        return Routing(logits=logits, probs=probs, weights=probs, indices=indices)
