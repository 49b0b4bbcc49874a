"""BASE layers (Lewis et al. 2021): a balanced assignment of inputs to experts in training."""

from __future__ import annotations

import torch
from torch import Tensor

from moe_exp.moe.gates.router import Router
from moe_exp.moe.routing import Routing, expert_capacity


class BASEGate(Router):
    """BASE layers (Lewis et al. 2021): balanced assignment in training, greedy in evaluation.

    Training: each expert gets exactly N/E inputs (ceil(N/E) when E does not divide N),
    chosen to maximise the summed router scores. ``assignment="sinkhorn"`` (default) solves
    this approximately (:func:`sinkhorn_assignment`, as S-BASE, Clark et al. 2022): within 1%
    of the best total score on random scores, O(N·E) per iteration. ``"exact"`` solves it
    exactly (:func:`balanced_assignment`; the paper uses an auction algorithm for the same
    problem), at a cost that grows as N³, too slow for large batches. Evaluation: top-1.
    The combine weight is σ(score) (``weighting="sigmoid"``, as in the paper, where a
    residual carries the rest) or the softmax probability (``"softmax"``); both < 1.
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
        weighting: str = "sigmoid",
        assignment: str = "sinkhorn",
    ) -> None:
        super().__init__(
            in_features, num_experts, 1, capacity_factor, eval_capacity_factor=eval_capacity_factor
        )
        if weighting not in ("sigmoid", "softmax"):
            raise ValueError(f"weighting={weighting!r} is not one of sigmoid, softmax")
        if assignment not in BALANCED_ASSIGNMENTS:
            choices = ", ".join(BALANCED_ASSIGNMENTS)
            raise ValueError(f"assignment={assignment!r} is not one of {choices}")
        self.weighting = weighting
        self.assignment = assignment

    def forward(self, h: Tensor) -> Routing:
        logits = self.logits(h)
        probs = logits.softmax(-1)
        if self.training:
            indices = BALANCED_ASSIGNMENTS[self.assignment](logits.detach()).unsqueeze(-1)
        else:
            indices = logits.argmax(-1, keepdim=True)
        scores = logits.gather(1, indices)
        weights = scores.sigmoid() if self.weighting == "sigmoid" else probs.gather(1, indices)
        return self._route(logits, probs, weights, indices)


def balanced_assignment(scores: Tensor) -> Tensor:
    """Expert per input maximising Σ scores with at most ceil(N/E) inputs per expert (exact)."""
    from scipy.optimize import linear_sum_assignment  # lazy: only BASE training needs scipy

    n, e = scores.shape
    per_expert = expert_capacity(1.0, 1, n, e)  # ceil(N/E)
    repeated = scores.double().cpu().repeat_interleave(per_expert, dim=1)  # [N, E·N/E]
    rows, cols = linear_sum_assignment(repeated.numpy(), maximize=True)
    experts = torch.empty(n, dtype=torch.long)
    experts[torch.from_numpy(rows)] = torch.from_numpy(cols // per_expert)
    return experts.to(scores.device)


def sinkhorn_assignment(scores: Tensor, iterations: int = 20) -> Tensor:
    """Expert per input with at most ceil(N/E) inputs per expert, near the best total score.

    Sinkhorn iterations (as in S-BASE, Clark et al. 2022, "Unified scaling laws for routed
    language models") scale exp(scores) into a plan whose rows sum to 1 and columns to N/E;
    each input then takes its most planned expert. An expert chosen by more than ceil(N/E)
    keeps those it plans most for; the others choose again among experts with room, so the
    cap holds exactly. O(N·E) per iteration (20 reach a fixed point on random scores).
    """
    n, e = scores.shape
    capacity = expert_capacity(1.0, 1, n, e)  # ceil(N/E)
    plan = scores.detach().float()
    for _ in range(iterations):  # in log space; the column target N/E is a constant shift
        plan = plan - plan.logsumexp(1, keepdim=True)
        plan = plan - plan.logsumexp(0, keepdim=True)
    experts = torch.full((n,), -1, dtype=torch.long, device=scores.device)
    taken = torch.zeros(e, dtype=torch.long, device=scores.device)
    waiting = torch.arange(n, device=scores.device)
    while waiting.numel():  # each round fills at least one expert: at most E rounds
        value, choice = plan[waiting].max(1)
        order = torch.argsort(value, descending=True, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]  # by expert, best first
        chosen = choice[order]
        counts = torch.bincount(chosen, minlength=e)
        first = counts.cumsum(0) - counts  # each expert's first place in ``chosen``
        rank = torch.arange(chosen.numel(), device=scores.device) - first[chosen]
        accept = rank < (capacity - taken)[chosen]
        experts[waiting[order[accept]]] = chosen[accept]
        taken += torch.bincount(chosen[accept], minlength=e)
        plan[:, taken >= capacity] = float("-inf")
        waiting = waiting[order[~accept]]
    return experts


BALANCED_ASSIGNMENTS = {"sinkhorn": sinkhorn_assignment, "exact": balanced_assignment}
