"""Classifiers built from the MoE library.

``MixtureClassifier`` is the classic mixture of Jacobs et al. (1991): each expert is a whole
image classifier, a separate small gating network reads the image and routes it, and the
combiner mixes the chosen experts' outputs with the gate weights.

``VisionMoE`` puts MoE layers inside a small vision transformer, routing patch tokens
(Riquelme et al. 2021, "Scaling vision with sparse mixture of experts").

``DenseBaseline`` is the control every MoE claim needs: one classifier of the expert's kind,
widened until it matches the mixture the same config would build, on active FLOPs per input
(``model=dense_flops``) or on total parameters (``model=dense_params``), as in the
compute-matched and parameter-matched baselines of Shazeer et al. (2017) and Fedus et al.
(2021).

All take the keywords ``build.build_components`` passes (in_shape, num_classes, num_experts,
expert, router, regularizers), return (log-probabilities, [Routing per MoE layer]; empty for
the dense baseline) and report ``parameter_counts()``.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_exp.measure.cost import count_flops, flops_per_sample
from moe_exp.moe import MoE, Regularizer, Routing
from moe_exp.moe.bank import ACTIVATIONS, MLPExpertBank
from moe_exp.moe.experts import build_experts, first_kind

COMBINES = ("probs", "logits")
MATCHES = ("flops", "params")
WIDTH_KNOBS = ("width", "hidden")  # the constructor argument that scales an expert
MAX_WIDTH = 1 << 14
log = logging.getLogger("moe_exp")


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
    :func:`~moe_exp.moe.experts.mixed` partial building all of them (its counts must sum to
    ``num_experts``).

    ``shared_experts`` (DeepSeekMoE, Dai et al. 2024) adds S always-on experts of the same
    kind (a mixed expert's first kind) that see every input, outside the router: with
    ``combine="logits"`` their logits are added with weight 1, z = Σ g_i z_i + Σ_s z_s; with
    ``combine="probs"`` the routed mixture and each shared expert get equal
    weight, p = (routed mixture + Σ_s p_s) / (1 + S), so p stays a distribution.

    Regularizers that declare ``needs_experts`` (the soft trees' ``tree_balance``) get the
    routed experts from the MoE layer.
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
        shared_experts: int = 0,
    ) -> None:
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine={combine!r} is not one of {', '.join(COMBINES)}")
        if shared_experts < 0:
            raise ValueError(f"model.shared_experts={shared_experts} must be >= 0")
        self.combine = combine
        self.channels_last = channels_last and len(in_shape) == 3
        self.gate_encoder = GateEncoder(in_shape, gate_width)
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
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        mixed, routing = self.moe(x, router_input=self.gate_encoder(x))
        return self.combine_log_probs(mixed, x), [routing]

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
        total = _count(self)
        per_expert = [_count(e) for e in self.moe.experts]
        always = total - sum(per_expert)
        k = self.moe.router.active_experts
        active = always + round(k * sum(per_expert) / len(per_expert))
        return {"params_total": total, "params_active": active}


def _fill_to_uniform(mixed: Tensor) -> Tensor:
    """Σ g_i p_i + (1 − Σ g_i)/C: the gates' unassigned weight goes to the uniform distribution."""
    leftover = (1.0 - mixed.sum(-1, keepdim=True)).clamp_min(0.0)
    return mixed + leftover / mixed.shape[-1]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class MoEBlock(nn.Module):
    """A pre-norm transformer block whose MLP is either dense or an MoE layer over tokens.

    The MoE variant routes every token on its own (``router`` reads the normalised token)
    to k experts of an :class:`~moe_exp.moe.bank.MLPExpertBank`; ``shared_hidden`` > 0 adds
    an always-on dense MLP of that width (S shared experts of width h sum to one MLP of
    width S·h exactly).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        hidden: int,
        activation: str,
        dropout: float,
        moe: MoE | None = None,
        shared_hidden: int = 0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.moe = moe
        self.mlp = None if moe is not None else _mlp(dim, hidden, activation, dropout)
        self.shared = _mlp(dim, shared_hidden, activation, dropout) if shared_hidden else None

    def forward(self, x: Tensor) -> tuple[Tensor, Routing | None]:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, h, need_weights=False)[0])
        h = self.norm2(x)
        routing = None
        if self.moe is None:
            y = self.mlp(h)
        else:
            tokens = h.reshape(-1, h.shape[-1])
            y, routing = self.moe(tokens)
            if self.shared is not None:
                y = y + self.shared(tokens)
            y = y.view_as(h)
        return x + self.drop(y), routing


def _mlp(dim: int, hidden: int, activation: str, dropout: float) -> nn.Module:
    act = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}[activation]
    return nn.Sequential(nn.Linear(dim, hidden), act(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class VisionMoE(nn.Module):
    """A small V-MoE (Riquelme et al. 2021): a vision transformer over patch tokens whose
    MLP is an MoE layer in every ``moe_every``-th block (blocks moe_every−1, 2·moe_every−1,
    …; the paper's "every other layer" is moe_every=2).

    patch×patch patches → linear embedding of width ``dim`` + learned position embedding →
    ``depth`` pre-norm transformer blocks → layer norm, mean over tokens → linear head.
    Each MoE layer's experts are one :class:`~moe_exp.moe.bank.MLPExpertBank` of
    ``num_experts`` MLPs dim → ``expert_hidden`` (default: the dense MLP width,
    ``mlp_ratio``·dim) → dim with ``expert_dropout`` on their hidden units (Switch
    Transformers' expert dropout; ``dropout`` is used elsewhere); its router is the
    configured gate with in_features = dim, routing each token. The ``expert`` partial of
    the config (a whole-image classifier) does not fit inside a block and is ignored.
    ``shared_experts`` adds S always-on MLP experts per MoE layer (DeepSeekMoE), summed
    with weight 1. Returns (log-probabilities, [Routing per MoE layer]).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        num_experts: int,
        expert: Callable[..., nn.Module] | None,
        router: Callable[..., nn.Module],
        regularizers: Mapping[str, Regularizer] | None = None,
        patch: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        expert_hidden: int | None = None,
        moe_every: int = 2,
        activation: str = "gelu",
        dropout: float = 0.0,
        expert_dropout: float = 0.0,
        shared_experts: int = 0,
    ) -> None:
        super().__init__()
        del expert  # whole-image experts do not fit in a token MLP: the bank replaces them
        if len(in_shape) != 3:
            raise ValueError(f"model=vmoe needs images (C, H, W), got in_shape={tuple(in_shape)}")
        c, height, width = in_shape
        if not 1 <= patch <= min(height, width):
            raise ValueError(f"model.patch={patch} must be in [1, {min(height, width)}]")
        if not 1 <= moe_every <= depth:
            raise ValueError(
                f"model.moe_every={moe_every} must be in [1, depth={depth}] "
                "(at least one MoE block)"
            )
        if dim % heads:
            raise ValueError(f"model.dim={dim} must be divisible by model.heads={heads}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation={activation!r} is not one of {', '.join(ACTIVATIONS)}"
            )
        if shared_experts < 0:
            raise ValueError(f"model.shared_experts={shared_experts} must be >= 0")
        hidden = max(1, round(mlp_ratio * dim))
        expert_hidden = expert_hidden or hidden
        self.moe_every = moe_every
        self.embed = nn.Conv2d(c, dim, patch, stride=patch)
        tokens = (height // patch) * (width // patch)
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.drop = nn.Dropout(dropout)
        blocks = []
        for i in range(depth):
            moe = None
            if (i + 1) % moe_every == 0:
                bank = MLPExpertBank(
                    num_experts, dim, expert_hidden, dim, activation, dropout=expert_dropout
                )
                moe = MoE(router(in_features=dim, num_experts=num_experts), bank, regularizers)
            blocks.append(
                MoEBlock(
                    dim,
                    heads,
                    hidden,
                    activation,
                    dropout,
                    moe=moe,
                    shared_hidden=shared_experts * expert_hidden if moe is not None else 0,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.moe for b in self.blocks if b.moe is not None]

    def forward(self, x: Tensor) -> tuple[Tensor, list[Routing]]:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # [B, T, dim]
        h = self.drop(tokens + self.pos)
        routings = []
        for block in self.blocks:
            h, routing = block(h)
            if routing is not None:
                routings.append(routing)
        logits = self.head(self.norm(h).mean(1))
        return F.log_softmax(logits, dim=-1), routings

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters, and those active for one token: all but the expert banks, plus
        k/E of each bank (the router's k; E for a dense gate)."""
        total = _count(self)
        active = float(total)
        for moe in self.moe_layers:
            bank = _count(moe.experts)
            active -= bank * (1 - moe.router.active_experts / moe.num_experts)
        return {"params_total": total, "params_active": round(active)}


# -- dense baselines ------------------------------------------------------------------------
def width_knob(factory: Callable[..., nn.Module]) -> str:
    """The keyword that scales an expert kind (CNN/ResNet ``width``, MLP ``hidden``)."""
    target = getattr(factory, "func", factory)
    names = inspect.signature(target).parameters
    for knob in WIDTH_KNOBS:
        if knob in names:
            return knob
    raise ValueError(
        f"a dense baseline scales the expert's width, but {target.__name__} has no "
        f"{' or '.join(WIDTH_KNOBS)} argument; use expert=cnn, mlp or resnet"
    )


def forward_flops(module: nn.Module, in_shape: Sequence[int]) -> float:
    """Forward FLOPs of ``module`` on one input (eval mode), as :mod:`moe_exp.measure.cost`
    counts them."""
    counter, _ = count_flops(module, torch.zeros(1, *in_shape))
    return float(counter.get_total_flops())


def match_width(cost: Callable[[int], float], target: float) -> int:
    """The integer width whose cost is nearest ``target`` in ratio; ``cost`` must grow with
    the width (doubling to bracket the target, then bisection)."""
    high = 1
    while cost(high) < target and high < MAX_WIDTH:
        high *= 2
    low = max(1, high // 2)
    while high - low > 1:  # cost(low) < target <= cost(high), unless clipped at the ends
        mid = (low + high) // 2
        low, high = (mid, high) if cost(mid) < target else (low, mid)
    return min((low, high), key=lambda w: abs(math.log(cost(w) / target)))


class DenseBaseline(nn.Module):
    """A single classifier of the expert's kind (a mixed expert's first kind), its width
    (CNN/ResNet ``width``, MLP ``hidden``) searched so that it matches the
    :class:`MixtureClassifier` these same arguments build, on forward FLOPs per input
    (``match="flops"``: the mixture's active FLOPs, gate included, as
    :func:`moe_exp.measure.cost.flops_per_sample` counts them) or on parameters (``match="params"``:
    the mixture's total). The other keywords are the mixture's, so one sweep
    ``model=mixture,dense_flops,dense_params`` compares the three under the same overrides.
    The nearest integer width usually lands within a few percent (``match_error``).
    Returns (log-probabilities, []): no MoE layer, no routing.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        num_experts: int,
        expert: Callable[..., nn.Module],
        router: Callable[..., nn.Module],
        regularizers: Mapping[str, Regularizer] | None = None,
        match: str = "flops",
        gate_width: int = 16,
        combine: str = "probs",
        channels_last: bool = True,
        shared_experts: int = 0,
    ) -> None:
        super().__init__()
        if match not in MATCHES:
            raise ValueError(f"model.match={match!r} is not one of {', '.join(MATCHES)}")
        in_shape = tuple(in_shape)
        with torch.random.fork_rng():  # the reference must not shift this model's init
            reference = MixtureClassifier(
                in_shape,
                num_classes,
                num_experts,
                expert,
                router,
                regularizers,
                gate_width=gate_width,
                combine=combine,
                channels_last=channels_last,
                shared_experts=shared_experts,
            )
            if match == "flops":
                probe = torch.randn(32, *in_shape, generator=torch.Generator().manual_seed(0))
                target = flops_per_sample(reference, probe)["flops_active"]
            else:
                target = float(_count(reference))
        del reference
        kind = first_kind(expert)
        knob = width_knob(kind)

        def build(width: int) -> nn.Module:
            return kind(in_shape=in_shape, num_outputs=num_classes, **{knob: width})

        def cost(width: int) -> float:
            with torch.random.fork_rng():
                net = build(width)
            return forward_flops(net, in_shape) if match == "flops" else float(_count(net))

        self.match, self.knob, self.target = match, knob, target
        self.width = match_width(cost, target)
        self.net = build(self.width)
        self.achieved = cost(self.width)
        self.match_error = self.achieved / target - 1.0
        self.channels_last = channels_last and len(in_shape) == 3
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        log.info(
            "dense baseline matched on %s: %s=%d gives %.4g vs the mixture's %.4g (%+.1f %%)",
            match,
            knob,
            self.width,
            self.achieved,
            target,
            100 * self.match_error,
        )

    def forward(self, x: Tensor) -> tuple[Tensor, list[Routing]]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return F.log_softmax(self.net(x), dim=-1), []

    def parameter_counts(self) -> dict[str, float]:
        """Every parameter is active; also the width found and how close the match came."""
        total = _count(self)
        return {
            "params_total": total,
            "params_active": total,
            "dense_width": self.width,
            "dense_match_error": self.match_error,
        }
