"""Top-k gating: the k largest logits, softmax over the kept ones (Shazeer et al. 2017)."""

from __future__ import annotations

from torch import Tensor

from moe_exp.moe.gates.router import Router, top_k_routing
from moe_exp.moe.routing import Routing


class TopKGate(Router):
    """Top-k gating: keep the k largest logits, softmax over them, zero elsewhere.

    The sparsely-gated layer of Shazeer et al. (2017) without the noise term.
    """

    renormalises_kept = True
    picks_top_logits = True
    example_args = {"k": 2}

    def forward(self, h: Tensor) -> Routing:
        logits = self.logits(h)
        weights, indices = top_k_routing(logits, self.k)
        return self._route(logits, logits.softmax(-1), weights, indices)
