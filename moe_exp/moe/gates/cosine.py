"""Cosine routing (X-MoE, Chi et al. 2022): scaled cosine similarity to expert embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_exp.moe.gates.topk import TopKGate


class CosineGate(TopKGate):
    """Cosine router (X-MoE, Chi et al. 2022, "On the representation collapse of sparse MoE").

    logits_i = cos(W·h, e_i) / τ: the input is projected to a low dimension (16), compared
    with L2-normalised expert embeddings, divided by a learnable temperature τ (init 0.07,
    clamped to >= ``min_temperature`` so logits stay bounded), then top-k with weights
    softmax over the kept logits.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 2,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        dim: int = 16,
        temperature: float = 0.07,
        min_temperature: float = 0.01,
    ) -> None:
        super().__init__(
            in_features,
            num_experts,
            k,
            capacity_factor,
            linear=False,
            eval_capacity_factor=eval_capacity_factor,
        )
        self.proj = nn.Linear(in_features, dim, bias=False)
        self.expert_embeddings = nn.Parameter(torch.randn(num_experts, dim) / math.sqrt(dim))
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))
        self.min_temperature = min_temperature

    def logits(self, h: Tensor) -> Tensor:
        cos = F.normalize(self.proj(h), dim=-1) @ F.normalize(self.expert_embeddings, dim=-1).T
        return cos / self.temperature.clamp_min(self.min_temperature)
