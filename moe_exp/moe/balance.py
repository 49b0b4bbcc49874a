"""Balance regularizers: auxiliary losses computed from a routing record.

Each loss is a plain function (``Routing`` in, unweighted scalar out) so it can be checked
against a hand computation, plus a small ``nn.Module`` carrying its weight (the paper's
default) for configs. Fractions here sum to 1 over experts: load counts are divided by their
total (k·N minus drops), and mean router probabilities sum to 1 by construction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moe_exp.moe.routing import Routing


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation, population variance (as in Shazeer et al. 2017)."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var(unbiased=False) / (x.mean() ** 2 + eps)


def importance_loss(routing: Routing) -> Tensor:
    """CV(Importance)², Importance_i = Σ_x G(x)_i (Shazeer et al. 2017, eq. 6-7)."""
    return cv_squared(routing.importance())


def load_loss(routing: Routing) -> Tensor:
    """CV(Load)², Load_i = Σ_x P(x, i), the smooth load of noisy top-k (Shazeer et al. 2017,
    appendix A, eq. 8-10).

    Routers without a noise model have no P(x, i); for them the dense router probabilities
    stand in as the differentiable load estimate.
    """
    smooth = routing.smooth_load if routing.smooth_load is not None else routing.probs
    return cv_squared(smooth.sum(0))


def switch_loss(routing: Routing) -> Tensor:
    """E · Σ_i f_i · P_i (Fedus et al. 2021, "Switch Transformers", eq. 4).

    f_i: fraction of assignments sent to expert i (top-k counts / k·N, not differentiable);
    P_i: mean router probability of expert i. Equals 1 under perfectly uniform routing.
    """
    f = routing.load_fraction().detach()
    p = routing.probs.float().mean(0)
    return routing.num_experts * (f * p).sum()


def z_loss(routing: Routing) -> Tensor:
    """Router z-loss, mean over inputs of logsumexp(logits)² (Zoph et al. 2022, "ST-MoE",
    eq. 5): keeps router logits small, which stabilises training (esp. in low precision)."""
    return routing.logits.float().logsumexp(-1).square().mean()


def entropy(p: Tensor) -> Tensor:
    """Shannon entropy (nats) of distributions along the last dim; 0·log 0 counts as 0."""
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)


def load_entropy_loss(routing: Routing) -> Tensor:
    """−H(mean_x p(x)) / log E: a bonus for spreading the batch's mean router distribution
    over all experts; −1 (its minimum) when the mean is uniform, 0 when one expert takes all.

    With :func:`gate_entropy_loss` at equal weight, the sum is −I(x; expert)/log E, the
    mutual-information balance loss (as in Mod-Squad, Chen et al. 2023, between tasks and
    experts): balanced overall, decisive per input.
    """
    e = routing.num_experts
    if e <= 1:
        return routing.probs.new_zeros(())
    return -entropy(routing.probs.float().mean(0)) / math.log(e)


def gate_entropy_loss(routing: Routing) -> Tensor:
    """Mean over inputs of H(p(x)) / log E: a penalty on undecided routing (sharpens each
    input's router distribution); 0 for one-hot, 1 for uniform per-input routing."""
    e = routing.num_experts
    if e <= 1:
        return routing.probs.new_zeros(())
    return entropy(routing.probs.float()).mean() / math.log(e)


class Regularizer(nn.Module):
    """A weighted auxiliary loss; ``forward`` returns the unweighted value.

    ``needs_experts``: the loss reads the experts, not only the routing record (the MoE
    layer hands them over with ``attach``).
    """

    needs_experts = False

    def __init__(self, weight: float) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"regularizer weight must be >= 0, got {weight}")
        self.weight = float(weight)


class ImportanceLoss(Regularizer):
    """CV² of importance (Shazeer et al. 2017); the paper's w_importance is 0.1."""

    def __init__(self, weight: float = 0.1) -> None:
        super().__init__(weight)

    def forward(self, routing: Routing) -> Tensor:
        return importance_loss(routing)


class LoadLoss(Regularizer):
    """CV² of the smooth load (Shazeer et al. 2017); the paper's w_load is 0.1."""

    def __init__(self, weight: float = 0.1) -> None:
        super().__init__(weight)

    def forward(self, routing: Routing) -> Tensor:
        return load_loss(routing)


class SwitchLoss(Regularizer):
    """Switch Transformer load-balancing loss; the paper's α is 0.01."""

    def __init__(self, weight: float = 0.01) -> None:
        super().__init__(weight)

    def forward(self, routing: Routing) -> Tensor:
        return switch_loss(routing)


class ZLoss(Regularizer):
    """ST-MoE router z-loss (Zoph et al. 2022); the paper's c_z is 0.001."""

    def __init__(self, weight: float = 0.001) -> None:
        super().__init__(weight)

    def forward(self, routing: Routing) -> Tensor:
        return z_loss(routing)


class LoadEntropyLoss(Regularizer):
    """Batch-level load-entropy bonus −H(mean p)/log E. No paper default: 0.01 (as Switch α)."""

    def __init__(self, weight: float = 0.01) -> None:
        super().__init__(weight)

    def forward(self, routing: Routing) -> Tensor:
        return load_entropy_loss(routing)


class GateEntropyLoss(Regularizer):
    """Per-input gate-entropy penalty mean H(p(x))/log E. No paper default: 0.01."""

    def __init__(self, weight: float = 0.01) -> None:
        super().__init__(weight)

    def forward(self, routing: Routing) -> Tensor:
        return gate_entropy_loss(routing)
