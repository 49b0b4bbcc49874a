"""The MoE layer: route, dispatch each input to its chosen experts only, combine.

Sparse compute: the (input, expert) assignments are sorted by expert and each expert runs
once on the contiguous block of inputs routed to it, so the cost grows with k, not with E.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from moe_exp.moe.balance import Regularizer
from moe_exp.moe.routing import Routing


@runtime_checkable
class GroupedExperts(Protocol):
    """Experts that compute all their blocks in one call (e.g. stacked weights, batched matmul).

    ``forward_grouped`` gets the inputs sorted by expert and each expert's block size, and
    returns the outputs in the same order.
    """

    num_experts: int

    def forward_grouped(self, x_sorted: Tensor, counts: list[int]) -> Tensor: ...


def sort_by_expert(routing: Routing, num_experts: int) -> tuple[Tensor, Tensor, list[int]]:
    """The kept (input, expert) assignments sorted by expert: (input rows, weights, counts)."""
    n, k = routing.indices.shape
    flat_expert = routing.indices.reshape(-1)
    flat_weight = routing.weights.reshape(-1)
    flat_input = torch.arange(n, device=flat_expert.device).repeat_interleave(k)
    keep = flat_expert >= 0  # capacity-dropped assignments carry index -1
    if not bool(keep.all()):
        flat_expert, flat_weight, flat_input = (
            flat_expert[keep],
            flat_weight[keep],
            flat_input[keep],
        )
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=num_experts).tolist()
    return flat_input[order], flat_weight[order], counts


def dispatch_combine(
    x: Tensor,
    routing: Routing,
    experts: Sequence[nn.Module] | GroupedExperts,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """y[n] = Σ_j weights[n, j] · transform(experts[indices[n, j]](x[n])).

    Each expert runs once on the block of inputs routed to it; ``transform`` (e.g. softmax)
    is applied to each expert's output before mixing.
    """
    grouped = isinstance(experts, GroupedExperts)
    rows, weights, counts = sort_by_expert(
        routing, experts.num_experts if grouped else len(experts)
    )
    if rows.numel() == 0:
        raise RuntimeError("no input was routed to any expert")
    if grouped:
        out = experts.forward_grouped(x[rows], counts)
    else:
        blocks = [
            expert(block)
            for expert, block, c in zip(experts, x[rows].split(counts), counts, strict=True)
            if c > 0
        ]
        out = torch.cat(blocks)
    if transform is not None:
        out = transform(out)
    out = out * weights.view(-1, *([1] * (out.dim() - 1))).to(out.dtype)
    return out.new_zeros((x.shape[0], *out.shape[1:])).index_add_(0, rows, out)


class MoE(nn.Module):
    """Router + experts + regularizers. ``forward`` returns (output, routing record).

    The router reads ``router_input`` when given (e.g. a separate gating network's features)
    and ``x`` otherwise; the experts always read ``x``.
    """

    def __init__(
        self,
        router: nn.Module,
        experts: Sequence[nn.Module] | GroupedExperts,
        regularizers: Mapping[str, Regularizer] | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        grouped = isinstance(experts, GroupedExperts)
        count = experts.num_experts if grouped else len(experts)
        if count != router.num_experts:
            raise ValueError(
                f"router has {router.num_experts} outputs but {count} experts were given"
            )
        self.router = router
        self.experts = experts if grouped else nn.ModuleList(experts)
        self.regularizers = nn.ModuleDict(dict(regularizers or {}))
        self.transform = transform

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    def forward(self, x: Tensor, router_input: Tensor | None = None) -> tuple[Tensor, Routing]:
        routing = self.router(x if router_input is None else router_input)
        y = dispatch_combine(x, routing, self.experts, self.transform)
        routing.aux_losses = {
            name: reg.weight * reg(routing)
            for name, reg in self.regularizers.items()
            if reg.weight > 0
        }
        return y, routing
