"""Hash routing (Roller et al. 2021), for images: a fixed random projection picks the expert."""

from __future__ import annotations

import torch
from torch import Tensor

from moe_exp.moe.gates.router import Router
from moe_exp.moe.routing import Routing


class HashGate(Router):
    """Hash routing (Roller et al. 2021, "Hash layers for large sparse models"), for images.

    Roller et al. hash token ids; an image has none, so this hashes the router input by a
    fixed random projection (seeded, a buffer) and sends it to the argmax bucket (top-k for
    k > 1, weights 1/k). The input is centred by a running mean (updated in training, no
    gradient) first, otherwise non-negative features (post-ReLU) fall mostly in one bucket.
    Routing ignores learning: no trainable parameters, no gradient to the router input, and
    regularizers cannot change it. A baseline for "does learned routing matter?".
    """

    picks_top_logits = True
    example_args = {"k": 2}

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        seed: int = 0,
        momentum: float = 0.1,
    ) -> None:
        super().__init__(
            in_features,
            num_experts,
            k,
            capacity_factor,
            linear=False,
            eval_capacity_factor=eval_capacity_factor,
        )
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "projection", torch.randn(in_features, num_experts, generator=generator)
        )
        self.register_buffer("center", torch.zeros(in_features))
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        self.momentum = momentum

    def logits(self, h: Tensor) -> Tensor:
        h = h.detach().float()
        if self.training:
            mean = h.mean(0)
            if int(self.batches_seen) == 0:
                self.center.copy_(mean)
            else:
                self.center.lerp_(mean, self.momentum)
            self.batches_seen += 1
        return (h - self.center) @ self.projection

    def forward(self, h: Tensor) -> Routing:
        logits = self.logits(h)
        indices = logits.topk(self.k, dim=-1).indices
        weights = logits.new_full(indices.shape, 1.0 / self.k)
        return self._route(logits, logits.softmax(-1), weights, indices)
