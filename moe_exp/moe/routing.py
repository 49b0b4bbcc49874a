"""The routing record: everything a router decided for one batch, in one place.

Losses, metrics and plots all read this record; nothing downstream recomputes routing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Routing:
    """One MoE layer's routing of N inputs over E experts.

    ``indices``/``weights`` hold the k chosen experts per input and their combine weights.
    An assignment dropped by a capacity limit has index -1 and weight 0.
    ``load`` counts assignments, so with top-k routing it sums to k·N (minus drops);
    :meth:`load_fraction` normalises it to sum to 1.
    """

    logits: Tensor  # [N, E] router logits (before noise)
    probs: Tensor  # [N, E] softmax over all experts (the dense router distribution)
    weights: Tensor  # [N, k] combine weights of the chosen experts
    indices: Tensor  # [N, k] chosen expert ids (long), -1 where dropped
    smooth_load: Tensor | None = None  # [N, E] differentiable P(expert i in top-k), noisy top-k
    dropped: int = 0  # assignments dropped by the capacity limit
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # weighted, by regularizer name

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def gates(self) -> Tensor:
        """Dense [N, E] combine weights (zero for experts not chosen)."""
        n, e = self.logits.shape
        dense = self.weights.new_zeros(n, e + 1)  # last column swallows dropped (-1) slots
        dense.scatter_add_(1, self.indices.masked_fill(self.indices < 0, e), self.weights)
        return dense[:, :e]

    def load(self) -> Tensor:
        """Assignments per expert, float [E] (counts; sums to k·N minus drops)."""
        idx = self.indices[self.indices >= 0]
        return torch.bincount(idx, minlength=self.num_experts).to(self.logits.dtype)

    def load_fraction(self) -> Tensor:
        load = self.load()
        return load / load.sum().clamp_min(1)

    def importance(self) -> Tensor:
        """Sum of combine weights per expert over the batch (Shazeer et al. 2017)."""
        return self.gates().sum(0)

    @property
    def dropped_fraction(self) -> float:
        return self.dropped / max(self.indices.numel(), 1)
