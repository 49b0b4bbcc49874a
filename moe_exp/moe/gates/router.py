"""The router base class: input features -> logits over experts -> a routing record.

Every gate takes ``(in_features, num_experts, ...)`` and returns a
:class:`~moe_exp.moe.routing.Routing` from ``forward(h)``, h of shape [N, in_features]. Sparse
gates also take ``capacity_factor`` (None: no limit); assignments beyond
ceil(capacity_factor · k · N / E) per expert are dropped by the shared
:func:`~moe_exp.moe.routing.limit_capacity`. Evaluation has its own limit,
``eval_capacity_factor`` (None: none, as GShard and DeepSpeed evaluate), so test metrics do
not depend on how much larger evaluation batches are than training ones. A gate states its
own rules on its class (``top1_only``, ``renormalises_kept``, its constructor's
``ValueError``), so a subclass inherits them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from moe_exp.moe.routing import Routing, expert_capacity, limit_capacity
from moe_exp.moe.rules import Composition, require


class Router(nn.Module):
    """A linear router: logits = h · W (+ b). Subclasses decide who gets each input.

    What a gate declares about itself (class attributes, inherited by subclasses):
    ``top1_only``: every input goes to exactly one expert, so the gate takes no ``k``;
    ``renormalises_kept``: the combine weights are renormalised over the k kept experts, so
    with k = 1 every weight is 1 and the task loss gives the router no gradient (such gates
    warn at k = 1); ``normalised_weights``: an input's combine weights sum to 1;
    ``picks_top_logits``: in evaluation the chosen experts are the k largest logits;
    ``unit_weights``: every combine weight lies in [0, 1];
    ``example_args``: constructor arguments beyond (in_features, num_experts) that a test
    builds it with.
    """

    top1_only: ClassVar[bool] = False
    renormalises_kept: ClassVar[bool] = False
    normalised_weights: ClassVar[bool] = True
    picks_top_logits: ClassVar[bool] = False
    unit_weights: ClassVar[bool] = True
    example_args: ClassVar[dict[str, Any]] = {}

    @classmethod
    def config_problems(cls, args: Mapping[str, Any], run: Composition) -> list[str]:
        """k within [1, experts]; a top-1 gate refuses a k > 1 the user asked for."""
        problems = []
        k, experts = run.k, run.experts
        if isinstance(k, int) and k < 1:
            problems.append(f"k={k} must be >= 1")
        elif isinstance(k, int) and isinstance(experts, int) and k > experts:
            problems.append(f"k={k} must be <= experts={experts}")
        if cls.top1_only and isinstance(k, int) and k > 1 and "k" in run.explicit:
            others = run.options("gate", lambda c: not getattr(c, "top1_only", True))
            hint = f", or a top-k gate: {', '.join(others)}" if others else ", or a top-k gate"
            problems.append(
                f"k={k} asks for top-{k} routing, but gate={run.name('gate')} is top-1 only "
                f"(every input goes to exactly one expert); use k=1{hint}"
            )
        return problems

    @property
    def active_experts(self) -> float:
        """Experts one input reaches on average (k; E for dense gates): what active-parameter
        and FLOP accounting multiplies by."""
        return float(self.k)

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: float | None = None,
        linear: bool = True,
        eval_capacity_factor: float | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        require(Router.config_problems({}, Composition(experts=num_experts, k=k)))
        for name, factor in (
            ("capacity_factor", capacity_factor),
            ("eval_capacity_factor", eval_capacity_factor),
        ):
            if factor is not None and factor <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {factor}")
        self.num_experts = num_experts
        self.k = k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        if k == 1 and num_experts > 1 and self.renormalises_kept:
            warnings.warn(
                f"{type(self).__name__} with k=1 renormalises the one kept weight to 1: the "
                "router gets no gradient from the task loss, only from aux losses; use the "
                "switch gate (weight p_i) for learned top-1 routing",
                stacklevel=2,
            )
        if linear:
            self.proj = nn.Linear(in_features, num_experts)

    def logits(self, h: Tensor) -> Tensor:
        return self.proj(h)

    def _route(self, logits: Tensor, probs: Tensor, weights: Tensor, indices: Tensor, **extra):
        """The routing record, with the capacity limit of the mode (training or evaluation)
        applied where it is set."""
        capacity, dropped = None, 0
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is not None:
            n, k = indices.shape
            capacity = expert_capacity(factor, k, n, self.num_experts)
            indices, weights, dropped = limit_capacity(indices, weights, self.num_experts, capacity)
        return Routing(
            logits=logits,
            probs=probs,
            weights=weights,
            indices=indices,
            dropped=dropped,
            capacity=capacity,
            **extra,
        )


def top_k_routing(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Pick the k largest logits; weights = softmax over the kept ones."""
    top_values, indices = logits.topk(k, dim=-1)
    return top_values.softmax(-1), indices
