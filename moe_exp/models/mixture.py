"""The classic mixture (Jacobs et al. 1991): whole-classifier experts behind a gating net.

Every model takes the keywords the app's build passes (in_shape, num_classes, num_experts,
expert, router, regularizers) and returns (log-probabilities, [Routing per MoE layer]).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_exp.moe import MoE, Regularizer, Routing
from moe_exp.moe.experts import build_experts, first_kind

COMBINES = ("probs", "logits")
# What the gating network sees of an image: all of it, a greyscale copy (the channel mean:
# hue gone, brightness kept), or its colour alone (each channel's mean over the image: the
# shape gone). The experts always see the whole image.
GATE_INPUTS = ("image", "grey", "colour")


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
            d = math.prod(in_shape)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(d, 4 * width), nn.ReLU())
            self.out_features = 4 * width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MixtureClassifier(nn.Module):
    """E whole-classifier experts behind one router; returns (log-probabilities, [routing]).

    ``combine="probs"`` mixes the experts' class distributions, p(y|x) = Σ g_i p_i(y|x),
    the competitive mixture of Jacobs et al. (1991) that rewards specialisation;
    ``combine="logits"`` mixes raw logits (cooperative, as in most sparse MoE layers).
    In probs mode, weight an input's gates leave unassigned (Switch's top-1 weight p_i < 1,
    expert choice, capacity drops) goes to the uniform distribution:
    p = Σ g_i p_i + (1 − Σ g_i)/C. The mixture stays a distribution, an input no expert took
    gets the uniform one, and a top-1 router keeps its task gradient (a larger g_i helps
    exactly when expert i beats chance on the label), as Switch's scaling by p_i intends.

    ``expert`` is a partial building one expert from (in_shape, num_outputs), or a
    :func:`~moe_exp.moe.experts.kinds.mixed` partial building all of them (its counts must sum to
    ``num_experts``).

    ``gate_input`` (:data:`GATE_INPUTS`) takes a feature away from the gate only, to ask
    what a gate routes on when the label does not need that feature.

    ``shared_experts`` (DeepSeekMoE, Dai et al. 2024) adds S always-on experts of the same
    kind (a mixed expert's first kind) that see every input, outside the router: with
    ``combine="logits"`` their logits are added with weight 1, z = Σ g_i z_i + Σ_s z_s; with
    ``combine="probs"`` the routed mixture and each shared expert get equal
    weight, p = (routed mixture + Σ_s p_s) / (1 + S), so p stays a distribution.

    Regularizers that declare ``needs_experts`` (the soft trees' ``tree_balance``) get the
    routed experts from the MoE layer.
    """

    # a gating network apart from whole-classifier experts: what the staged and EM strategies
    # train one side at a time
    separate_gate = True

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
        shared_experts: int = 0,
        gate_input: str = "image",
    ) -> None:
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine={combine!r} is not one of {', '.join(COMBINES)}")
        if gate_input not in GATE_INPUTS:
            raise ValueError(f"gate_input={gate_input!r} is not one of {', '.join(GATE_INPUTS)}")
        if shared_experts < 0:
            raise ValueError(f"model.shared_experts={shared_experts} must be >= 0")
        self.combine = combine
        self.channels_last = channels_last and len(in_shape) == 3
        self.gate_input = gate_input if len(in_shape) == 3 else "image"
        gate_shape = tuple(in_shape)
        if self.gate_input == "grey":
            gate_shape = (1, *gate_shape[1:])
        self.gate_encoder = GateEncoder(gate_shape, gate_width)
        experts = build_experts(expert, num_experts, in_shape, num_classes)
        self.shared = nn.ModuleList(
            first_kind(expert)(in_shape=tuple(in_shape), num_outputs=num_classes)
            for _ in range(shared_experts)
        )
        self.moe = MoE(
            router(in_features=self.gate_encoder.out_features, num_experts=num_experts),
            experts,
            regularizers,
            transform=(lambda z: z.softmax(-1)) if combine == "probs" else None,
            record_predictions=True,
        )
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Routing]]:
        x = self.lay_out(x)
        mixed, routing = self.moe(x, router_input=self.gate_features(x))
        return self.combine_log_probs(mixed, x), [routing]

    # The pieces of the forward pass, for strategies that train gate and experts apart.
    def lay_out(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def route(self, x: Tensor) -> Routing:
        """The gate's decision for ``x`` (no aux losses: those belong to joint training)."""
        return self.moe.router(self.gate_features(self.lay_out(x)))

    def gate_features(self, x: Tensor) -> Tensor:
        """The gating network's features of (laid out) images, from what it may see."""
        if self.gate_input == "grey":
            x = x.mean(1, keepdim=True)
        elif self.gate_input == "colour":
            x = x.mean((2, 3), keepdim=True).expand_as(x)
        return self.gate_encoder(x)

    def expert_logits(self, x: Tensor) -> Tensor:
        """Every expert's raw outputs on every input, [N, E, C]."""
        return self.moe.expert_outputs(self.lay_out(x))

    def routed_log_probs(self, x: Tensor, routing: Routing) -> Tensor:
        """log p(y|x) with the experts ``routing`` chose, mixed as the forward pass mixes."""
        x = self.lay_out(x)
        return self.combine_log_probs(self.moe.combine(x, routing), x)

    def mix_log_probs(self, expert_logits: Tensor, gates: Tensor, x: Tensor) -> Tensor:
        """log p(y|x) from every expert's outputs [N, E, C] and dense gates [N, E]."""
        transform = self.moe.transform
        outputs = transform(expert_logits) if transform is not None else expert_logits
        return self.combine_log_probs((gates.unsqueeze(-1) * outputs).sum(1), x)

    def combine_log_probs(self, mixed: Tensor, x: Tensor) -> Tensor:
        """The combiner's last step: the routed mixture (the MoE layer's output) plus the
        shared experts (which read ``x``) → log p(y|x). Training strategies that mix the
        experts themselves finish through here too."""
        if self.combine == "probs":
            mixed = _fill_to_uniform(mixed)
            if len(self.shared):
                shared = sum(e(x).softmax(-1) for e in self.shared)
                mixed = (mixed + shared) / (1 + len(self.shared))
            return mixed.clamp_min(1e-12).log()
        if len(self.shared):
            mixed = mixed + sum(e(x) for e in self.shared)
        return F.log_softmax(mixed, dim=-1)

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters, and those active for one input: the gate, the shared experts and
        k routed experts (k times the mean routed expert, for a mixed set)."""
        total = count_parameters(self)
        per_expert = [count_parameters(e) for e in self.moe.experts]
        always = total - sum(per_expert)
        k = self.moe.router.active_experts
        active = always + round(k * sum(per_expert) / len(per_expert))
        return {"params_total": total, "params_active": active}


def _fill_to_uniform(mixed: Tensor) -> Tensor:
    """Σ g_i p_i + (1 − Σ g_i)/C: the gates' unassigned weight goes to the uniform
    distribution; weights that sum past 1 (unnormalised gates, e.g. ReLU routing) are scaled
    back to a distribution instead."""
    total = mixed.sum(-1, keepdim=True)
    leftover = (1.0 - total).clamp_min(0.0)
    return (mixed + leftover / mixed.shape[-1]) / total.clamp_min(1.0)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
