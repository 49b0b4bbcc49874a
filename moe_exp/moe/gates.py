"""Routers: input features -> logits over experts -> (combine weights, chosen experts).

Every router is an ``nn.Module`` taking ``(in_features, num_experts, ...)`` and returning a
:class:`~moe_exp.moe.routing.Routing` from ``forward(h)`` with ``h`` of shape [N, in_features].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_exp.moe.routing import Routing


class Router(nn.Module):
    """A linear router: logits = h · W (+ b). Subclasses decide who gets each input."""

    sparse: bool = True

    def __init__(self, in_features: int, num_experts: int, k: int = 1) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
        self.num_experts = num_experts
        self.k = k
        self.proj = nn.Linear(in_features, num_experts)

    def logits(self, h: Tensor) -> Tensor:
        return self.proj(h)


class SoftmaxGate(Router):
    """Dense softmax gating: every expert runs on every input, weighted by softmax(h·W).

    Jacobs, Jordan, Nowlan & Hinton (1991), "Adaptive mixtures of local experts".
    ``k`` is accepted for a uniform signature and ignored: a dense gate uses all experts.
    """

    sparse = False

    def __init__(self, in_features: int, num_experts: int, k: int | None = None) -> None:
        super().__init__(in_features, num_experts, k=num_experts)

    def forward(self, h: Tensor) -> Routing:
        logits = self.logits(h)
        probs = logits.softmax(-1)
        indices = torch.arange(self.num_experts, device=h.device).expand(h.shape[0], -1)
        return Routing(logits=logits, probs=probs, weights=probs, indices=indices)


def _top_k_routing(logits: Tensor, selection_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Pick the k largest ``selection_logits``; weights = softmax over the kept ones."""
    top_values, indices = selection_logits.topk(k, dim=-1)
    return top_values.softmax(-1), indices


class TopKGate(Router):
    """Top-k gating: keep the k largest logits, softmax over them, zero elsewhere.

    The sparsely-gated layer of Shazeer et al. (2017) without the noise term.
    """

    def forward(self, h: Tensor) -> Routing:
        logits = self.logits(h)
        weights, indices = _top_k_routing(logits, logits, self.k)
        return Routing(logits=logits, probs=logits.softmax(-1), weights=weights, indices=indices)


class NoisyTopKGate(Router):
    """Noisy top-k gating (Shazeer et al. 2017, "Outrageously large neural networks", eq. 3-5).

    H(x)_i = (x·W_g)_i + ε·softplus((x·W_noise)_i), ε ~ N(0, 1), during training only;
    G(x) = softmax(KeepTopK(H(x), k)). Both projections start at zero, as in the paper, so
    early routing is pure noise and every expert gets inputs. The record also carries the
    smooth load estimator P(x, i) = Φ(((x·W_g)_i − kth_excluding(H(x), k, i)) / σ_i(x))
    (paper appendix A), which the load loss differentiates.
    """

    def __init__(self, in_features: int, num_experts: int, k: int = 2) -> None:
        super().__init__(in_features, num_experts, k)
        self.noise = nn.Linear(in_features, num_experts)
        for layer in (self.proj, self.noise):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: Tensor) -> Routing:
        clean = self.logits(h)
        if not self.training:
            weights, indices = _top_k_routing(clean, clean, self.k)
            return Routing(logits=clean, probs=clean.softmax(-1), weights=weights, indices=indices)
        std = F.softplus(self.noise(h)) + 1e-2  # floor: keeps the Φ argument finite
        noisy = clean + torch.randn_like(clean) * std
        weights, indices = _top_k_routing(noisy, noisy, self.k)
        return Routing(
            logits=clean,
            probs=clean.softmax(-1),
            weights=weights,
            indices=indices,
            smooth_load=self._smooth_load(clean, noisy, std),
        )

    def _smooth_load(self, clean: Tensor, noisy: Tensor, std: Tensor) -> Tensor:
        """P(x, i): probability that expert i stays in the top k when only its noise is redrawn."""
        if self.k >= self.num_experts:
            return torch.ones_like(clean)
        top = noisy.topk(self.k + 1, dim=-1).values
        threshold_if_in = top[:, self.k : self.k + 1]  # k-th largest of the others when i is in
        threshold_if_out = top[:, self.k - 1 : self.k]  # k-th largest overall when i is out
        is_in = noisy > threshold_if_in
        threshold = torch.where(is_in, threshold_if_in, threshold_if_out)
        normal = torch.distributions.Normal(0.0, 1.0)
        return normal.cdf((clean - threshold) / std)
