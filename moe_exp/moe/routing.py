"""The routing record: everything a router decided for one batch, in one place.

Losses, metrics and plots all read this record; nothing downstream recomputes routing.
The capacity limit lives here too (:func:`limit_capacity`), shared by every sparse router.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Routing:
    """One MoE layer's routing of N inputs over E experts.

    ``indices``/``weights`` hold the chosen experts per input and their combine weights.
    An assignment dropped by a capacity limit (or not chosen, for expert-choice routing, whose
    ``indices`` are [N, E]) has index -1 and weight 0.
    ``load`` counts assignments, so with top-k routing it sums to k·N (minus drops);
    :meth:`load_fraction` normalises it to sum to 1.

    Soft MoE (Puigcerver et al. 2023) does not route inputs: it mixes them into slots. Its
    record carries ``dispatch``/``combine`` [N, E, S] (S slots per expert in each of
    ``groups`` consecutive groups of inputs), ``indices`` = every expert, ``weights`` = the
    combine weights summed over each expert's slots, and
    :func:`~moe_exp.moe.layer.dispatch_combine` takes the slot path when ``dispatch`` is set.
    """

    logits: Tensor  # [N, E] router logits (before noise)
    probs: Tensor  # [N, E] softmax over all experts (the dense router distribution)
    weights: Tensor  # [N, k] combine weights of the chosen experts
    indices: Tensor  # [N, k] chosen expert ids (long), -1 where dropped / not chosen
    smooth_load: Tensor | None = None  # [N, E] differentiable P(expert i in top-k), noisy top-k
    dropped: int = 0  # assignments dropped by the capacity limit
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # weighted, by regularizer name
    # per kept assignment, when experts are classifiers: (input row, expert id, predicted class)
    expert_predictions: tuple[Tensor, Tensor, Tensor] | None = None
    capacity: int | None = None  # per-expert capacity applied (None: unlimited)
    dispatch: Tensor | None = None  # [N, E, S] soft MoE: softmax over inputs, per slot
    combine: Tensor | None = None  # [N, E, S] soft MoE: softmax over all slots, per input
    groups: int = 1  # soft MoE: consecutive groups of inputs, each with its own slots

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @property
    def is_soft(self) -> bool:
        return self.dispatch is not None

    def log_probs(self) -> Tensor:
        """log ``probs``: the router's distribution over all experts, for losses on it.

        Not ``log_softmax(logits)``: a hierarchical gate's probs are group × within-group
        softmaxes, which no single softmax of its logits gives.
        """
        return self.probs.clamp_min(torch.finfo(self.probs.dtype).tiny).log()

    def gates(self) -> Tensor:
        """Dense [N, E] combine weights (zero for experts not chosen)."""
        n, e = self.logits.shape
        dense = self.weights.new_zeros(n, e + 1)  # last column swallows dropped (-1) slots
        dense.scatter_add_(1, self.indices.masked_fill(self.indices < 0, e), self.weights)
        return dense[:, :e]

    def load(self) -> Tensor:
        """Assignments per expert, float [E] (counts; sums to k·N minus drops).

        Soft MoE assigns no input outright: its load is the combine mass per expert.
        """
        if self.is_soft:
            return self.importance().float()
        e = self.num_experts
        slots = self.indices.masked_fill(self.indices < 0, e).reshape(-1)  # slot E: dropped
        # float32, not the logits' dtype: bf16 rounds counts above 256; a scatter, not a
        # masked select or bincount, so the counts need no copy to the host on a GPU
        ones = torch.ones(slots.shape, dtype=torch.float32, device=slots.device)
        return torch.zeros(e + 1, dtype=torch.float32, device=slots.device).index_add_(
            0, slots, ones
        )[:e]

    def load_fraction(self) -> Tensor:
        load = self.load()
        return load / load.sum().clamp_min(1)

    def importance(self) -> Tensor:
        """Sum of combine weights per expert over the batch (Shazeer et al. 2017)."""
        return self.gates().sum(0)

    def experts_per_input(self) -> Tensor:
        """How many experts each input reached, long [N] (0: unrouted, e.g. expert choice)."""
        return (self.indices >= 0).sum(-1)

    @property
    def dropped_fraction(self) -> float:
        return self.dropped / max(self.indices.numel(), 1)


def expert_capacity(capacity_factor: float, k: int, num_inputs: int, num_experts: int) -> int:
    """Per-expert buffer ceil(capacity_factor · k · N / E) (GShard; Fedus et al. 2021)."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return math.ceil(capacity_factor * k * num_inputs / num_experts)


def limit_capacity(
    indices: Tensor, weights: Tensor, num_experts: int, capacity: int
) -> tuple[Tensor, Tensor, int]:
    """Drop assignments beyond ``capacity`` per expert: index -1, weight 0.

    Priority (as in GShard): every input's first choice before any input's second choice,
    and within a choice rank, lower input index first (the batch is shuffled, so this is
    random order). One stable sort over the N·k assignments; returns (indices, weights,
    number dropped).
    """
    n, k = indices.shape
    flat = indices.t().reshape(-1)  # rank-major: all first choices, then all second choices
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat + 1, minlength=num_experts + 1)  # slot 0 counts the -1s
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(flat)
    position[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order] + 1]
    keep = ((flat >= 0) & (position < capacity)).view(k, n).t()
    dropped = int((indices >= 0).sum() - keep.sum())
    if dropped == 0:
        return indices, weights, 0
    return indices.masked_fill(~keep, -1), weights.masked_fill(~keep, 0.0), dropped
