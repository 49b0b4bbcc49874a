"""Two-level gating (Jordan & Jacobs 1994; Shazeer et al. 2017 appendix B): groups, then experts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from moe_exp.moe.gates.router import Router, top_k_routing
from moe_exp.moe.routing import Routing
from moe_exp.moe.rules import Composition, require


class HierarchicalGate(Router):
    """Two-level gating (Jordan & Jacobs 1994; Shazeer et al. 2017, appendix B).

    A top gate over G = ``num_groups`` groups keeps ``k_group`` groups; each group's own gate
    over its E/G experts keeps ``k`` of them (softmax over the kept, at both levels). Weight
    = group weight × expert weight, so each input gets k_group·k experts (``self.k``).
    ``probs`` is the two-level distribution p(g)·p(e|g); ``logits`` the summed raw logits.
    With k_group = 1 the group weight is 1 and the top gate learns only via regularizers.
    """

    example_args = {"k": 2, "num_groups": 2, "k_group": 2}

    @classmethod
    def config_problems(cls, args: Mapping[str, Any], run: Composition) -> list[str]:
        """Groups divide the experts; k fits in a group; k_group fits in the groups."""
        problems = super().config_problems(args, run)
        experts, groups = run.experts, args.get("num_groups", 2)
        k, k_group = args.get("k", 1), args.get("k_group", 1)
        if isinstance(groups, int) and groups < 1:
            return [*problems, f"gate.num_groups={groups} must be >= 1"]
        if not (isinstance(experts, int) and isinstance(groups, int)):
            return problems
        if experts % groups:
            divisors = [d for d in range(1, experts + 1) if experts % d == 0]
            problems.append(
                f"gate.num_groups={groups} must divide experts={experts} "
                f"(allowed: {', '.join(map(str, divisors))})"
            )
        elif isinstance(k, int) and k > experts // groups:
            problems.append(
                f"k={k} must be <= experts per group={experts // groups} for "
                f"gate={run.name('gate')} (experts={experts}, gate.num_groups={groups})"
            )
        if isinstance(k_group, int) and k_group > groups:
            problems.append(f"gate.k_group={k_group} must be <= gate.num_groups={groups}")
        return problems

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 1,
        num_groups: int = 2,
        k_group: int = 1,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
    ) -> None:
        args = {"k": k, "num_groups": num_groups, "k_group": k_group}
        require(self.config_problems(args, Composition(experts=num_experts, k=k)))
        per_group = num_experts // num_groups
        super().__init__(
            in_features,
            num_experts,
            k * k_group,
            capacity_factor,
            linear=False,
            eval_capacity_factor=eval_capacity_factor,
        )
        self.num_groups, self.per_group = num_groups, per_group
        self.k_within, self.k_group = k, k_group
        self.group_proj = nn.Linear(in_features, num_groups)
        self.proj = nn.Linear(in_features, num_experts)  # row block g = group g's own gate

    def forward(self, h: Tensor) -> Routing:
        n, g, m = h.shape[0], self.num_groups, self.per_group
        group_logits = self.group_proj(h)  # [N, G]
        expert_logits = self.proj(h).view(n, g, m)  # [N, G, E/G]
        group_weights, groups = top_k_routing(group_logits, self.k_group)
        kept = expert_logits.gather(1, groups.unsqueeze(-1).expand(-1, -1, m))  # [N, kg, E/G]
        expert_weights, local = top_k_routing(kept, self.k_within)  # [N, kg, k]
        weights = (group_weights.unsqueeze(-1) * expert_weights).flatten(1)
        indices = (groups.unsqueeze(-1) * m + local).flatten(1)
        probs = group_logits.softmax(-1).unsqueeze(-1) * expert_logits.softmax(-1)
        logits = group_logits.unsqueeze(-1) + expert_logits
        return self._route(logits.flatten(1), probs.flatten(1), weights, indices)
