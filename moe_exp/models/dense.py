"""Dense baselines: one classifier of the expert's kind, matched to a mixture on FLOPs or params.

The control every MoE claim needs: compute-matched and parameter-matched baselines, as in
Shazeer et al. (2017) and Fedus et al. (2021).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_exp.measure.cost import count_flops, flops_per_sample
from moe_exp.models.mixture import MixtureClassifier, count_parameters
from moe_exp.moe import Regularizer, Routing
from moe_exp.moe.experts import first_kind
from moe_exp.moe.rules import Composition

MATCHES = ("flops", "params")
WIDTH_KNOBS = ("width", "hidden")  # the constructor argument that scales an expert
MAX_WIDTH = 1 << 14
log = logging.getLogger("moe_exp")


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


def width_problems(kind: Any, model: str) -> list[str]:
    """The rule of :func:`width_knob` as a config check's message."""
    try:
        width_knob(kind)
    except ValueError as err:
        return [f"model={model}: {err}"]
    return []


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

    @classmethod
    def config_problems(cls, args: Mapping[str, Any], run: Composition) -> list[str]:
        """The expert kind must have a width to scale (the first kind of a mixed expert)."""
        kinds = [t for t in run.expert_targets if isinstance(t, type)]
        return width_problems(kinds[0], run.name("model")) if kinds else []

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
        gate_input: str = "image",
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
                gate_input=gate_input,
            )
            if match == "flops":
                probe = torch.randn(32, *in_shape, generator=torch.Generator().manual_seed(0))
                target = flops_per_sample(reference, probe)["flops_active"]
            else:
                target = float(count_parameters(reference))
        del reference
        kind = first_kind(expert)
        knob = width_knob(kind)

        def make(width: int) -> nn.Module:
            return kind(in_shape=in_shape, num_outputs=num_classes, **{knob: width})

        def cost(width: int) -> float:
            with torch.random.fork_rng():
                net = make(width)
            return (
                forward_flops(net, in_shape) if match == "flops" else float(count_parameters(net))
            )

        self.match, self.knob, self.target = match, knob, target
        self.width = match_width(cost, target)
        self.net = make(self.width)
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
        total = count_parameters(self)
        return {
            "params_total": total,
            "params_active": total,
            "dense_width": self.width,
            "dense_match_error": self.match_error,
        }
