"""Classifiers built from the MoE library.

``MixtureClassifier`` is the classic mixture of Jacobs et al. (1991): each expert is a whole
image classifier, a separate small gating network reads the image and routes it, and the
combiner mixes the chosen experts' outputs with the gate weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_exp.moe import MoE, Regularizer, Routing

COMBINES = ("probs", "logits")


class GateEncoder(nn.Module):
    """The gating network's own feature extractor: two strided convs (or an MLP for vectors)."""

    def __init__(self, in_shape: Sequence[int], width: int = 16) -> None:
        super().__init__()
        if len(in_shape) == 3:
            c = in_shape[0]
            self.net = nn.Sequential(
                nn.Conv2d(c, width, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(2),
                nn.Flatten(),
            )
            self.out_features = 8 * width
        else:
            d = int(torch.tensor(in_shape).prod())
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(d, 4 * width), nn.ReLU())
            self.out_features = 4 * width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MixtureClassifier(nn.Module):
    """E whole-classifier experts behind one router; returns (log-probabilities, [routing]).

    ``combine="probs"`` mixes the experts' class distributions, p(y|x) = Σ g_i p_i(y|x),
    the competitive mixture of Jacobs et al. (1991) that rewards specialisation;
    ``combine="logits"`` mixes raw logits (cooperative, as in most sparse MoE layers).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        num_experts: int,
        expert: Callable[..., nn.Module],
        router: Callable[..., nn.Module],
        regularizers: Mapping[str, Regularizer] | None = None,
        gate_width: int = 16,
        combine: str = "probs",
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine={combine!r} is not one of {', '.join(COMBINES)}")
        self.combine = combine
        self.channels_last = channels_last and len(in_shape) == 3
        self.gate_encoder = GateEncoder(in_shape, gate_width)
        experts = [
            expert(in_shape=tuple(in_shape), num_outputs=num_classes) for _ in range(num_experts)
        ]
        self.moe = MoE(
            router(in_features=self.gate_encoder.out_features, num_experts=num_experts),
            experts,
            regularizers,
            transform=(lambda z: z.softmax(-1)) if combine == "probs" else None,
        )
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Routing]]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        mixed, routing = self.moe(x, router_input=self.gate_encoder(x))
        if self.combine == "probs":
            log_probs = mixed.clamp_min(1e-12).log()
        else:
            log_probs = F.log_softmax(mixed, dim=-1)
        return log_probs, [routing]

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters, and those active for one input (shared parts + k experts)."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        total = count(self)
        per_expert = [count(e) for e in self.moe.experts]
        shared = total - sum(per_expert)
        k = self.moe.router.k
        active = shared + round(k * sum(per_expert) / len(per_expert))
        return {"params_total": total, "params_active": active}
