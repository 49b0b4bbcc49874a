"""Sigmoid scoring with normalised top-k (DeepSeek-V3, 2024), without the balancing bias."""

from __future__ import annotations

from torch import Tensor

from moe_exp.moe.gates.router import Router
from moe_exp.moe.routing import Routing


class SigmoidTopKGate(Router):
    """s_i = σ(h·W)_i; keep the k largest scores; weight_i = s_i / Σ_{j kept} s_j.

    Unlike softmax top-k, each expert's affinity is scored on its own (a sigmoid, not a
    competition over experts), and only the kept scores are normalised (DeepSeek-V3
    technical report, eq. 12-16; the routed scaling factor is left out: the mixture's
    combiner fixes the scale). The balancing bias of the paper is ``gate=bias_balanced``.
    """

    renormalises_kept = True
    picks_top_logits = True
    example_args = {"k": 2}

    def forward(self, h: Tensor) -> Routing:
        logits = self.logits(h)
        scores = logits.sigmoid()
        kept, indices = scores.topk(self.k, dim=-1)
        weights = kept / kept.sum(-1, keepdim=True).clamp_min(1e-9)
        return self._route(logits, logits.softmax(-1), weights, indices)
