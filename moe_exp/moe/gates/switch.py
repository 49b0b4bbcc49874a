"""Switch routing (Fedus et al. 2021): top-1, weighted by the router's own probability."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_exp.moe.gates.router import Router
from moe_exp.moe.routing import Routing


class SwitchGate(Router):
    """Switch routing (Fedus et al. 2021, "Switch Transformers"): top-1, weight = p_i(x).

    The combine weight is the router probability of the chosen expert (not renormalised to
    1), which is how the router gets a task gradient with a single expert. In training the
    router input is multiplied by uniform noise in [1 − jitter, 1 + jitter] (the paper's
    jitter, eps = 0.01), and the router runs in float32 even under autocast (the paper's
    "selective precision"). ``logits`` records the (jittered) logits actually used.
    """

    top1_only = True
    normalised_weights = False
    picks_top_logits = True

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        jitter: float = 0.01,
    ) -> None:
        super().__init__(
            in_features, num_experts, 1, capacity_factor, eval_capacity_factor=eval_capacity_factor
        )
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.jitter = jitter

    def forward(self, h: Tensor) -> Routing:
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = h.float()
            if self.training and self.jitter > 0:
                h = h * torch.empty_like(h).uniform_(1 - self.jitter, 1 + self.jitter)
            logits = F.linear(h, self.proj.weight.float(), self.proj.bias.float())
            probs = logits.softmax(-1)
            weights, indices = probs.max(-1, keepdim=True)
        return self._route(logits, probs, weights, indices)
