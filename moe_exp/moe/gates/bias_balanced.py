"""Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3): a bias steers top-k."""

from __future__ import annotations

import torch
from torch import Tensor

from moe_exp.moe.gates.router import Router
from moe_exp.moe.routing import Routing


class BiasBalancedGate(Router):
    """Auxiliary-loss-free balancing (Wang et al. 2024, "Auxiliary-loss-free load balancing
    strategy for mixture-of-experts"; used by DeepSeek-V3).

    Experts are chosen by top-k of (score + b), with score = σ(logits) (or softmax), and
    combined with the unbiased scores normalised over the chosen k. The bias b is a buffer,
    not trained by gradient: after each training forward it moves by
    γ · sign(mean load − load_i) (γ = ``bias_update_rate``, paper 0.001), with the routing
    record's load (after any capacity drop). ``update_in_forward=False`` leaves that to an explicit
    :meth:`update_bias` call (e.g. once per optimizer step with gradient accumulation). The
    bias never changes in evaluation. Under DDP the loads are summed over ranks first.
    """

    renormalises_kept = True
    example_args = {"k": 2}

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 2,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        score: str = "sigmoid",
        bias_update_rate: float = 0.001,
        update_in_forward: bool = True,
    ) -> None:
        super().__init__(
            in_features, num_experts, k, capacity_factor, eval_capacity_factor=eval_capacity_factor
        )
        if score not in ("sigmoid", "softmax"):
            raise ValueError(f"score={score!r} is not one of sigmoid, softmax")
        if bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate}")
        self.score = score
        self.bias_update_rate = bias_update_rate
        self.update_in_forward = update_in_forward
        self.register_buffer("bias", torch.zeros(num_experts))

    def forward(self, h: Tensor) -> Routing:
        logits = self.logits(h)
        probs = logits.softmax(-1)
        scores = logits.sigmoid() if self.score == "sigmoid" else probs
        indices = (scores.detach() + self.bias).topk(self.k, dim=-1).indices
        chosen = scores.gather(1, indices)
        weights = chosen / chosen.sum(-1, keepdim=True).clamp_min(1e-9)
        routing = self._route(logits, probs, weights, indices)
        if self.training and self.update_in_forward:
            self.update_bias(routing)
        return routing

    @torch.no_grad()
    def update_bias(self, routing: Routing) -> None:
        """b_i += γ · sign(mean load − load_i), from the record's load (after any capacity
        drop, the same in forward and in an explicit call)."""
        load = routing.load().to(self.bias.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        self.bias += self.bias_update_rate * torch.sign(load.mean() - load)
