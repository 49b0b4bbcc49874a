"""Balance regularizers: auxiliary losses computed from a routing record.

Each loss is a plain function (``Routing`` in, unweighted scalar out) so it can be checked
against a hand computation, plus a small ``nn.Module`` carrying its weight for configs.
Fractions here sum to 1 over experts (load counts are divided by k·N).
"""

from __future__ import annotations

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


class Regularizer(nn.Module):
    """A weighted auxiliary loss; ``forward`` returns the unweighted value."""

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
