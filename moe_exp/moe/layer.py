"""The MoE layer: route, dispatch each input to its chosen experts only, combine.

Sparse compute: the (input, expert) assignments are sorted by expert and each expert runs
once on the contiguous block of inputs routed to it, so the cost grows with k, not with E.
Soft MoE records (``routing.dispatch`` set) take :func:`soft_dispatch_combine` instead:
each expert runs once on its S slots, so the cost grows with E·S, not with N.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from moe_exp.moe.balance import Regularizer
from moe_exp.moe.layout import ExpertLayout
from moe_exp.moe.routing import Routing


@runtime_checkable
class GroupedExperts(Protocol):
    """Experts that compute all their blocks in one call (e.g. stacked weights, batched matmul).

    ``forward_grouped`` gets the inputs sorted by expert and each expert's block size, and
    returns the outputs in the same order.
    """

    num_experts: int

    def forward_grouped(self, x_sorted: Tensor, counts: list[int]) -> Tensor: ...


@runtime_checkable
class LaidOutExperts(GroupedExperts, Protocol):
    """Grouped experts that choose where each expert's rows sit (e.g. padded pairs, see
    :class:`~moe_exp.moe.layout.ExpertLayout`): the layer then gathers the inputs straight
    into that buffer and combines straight from it, with no copy in sorted order."""

    def layout(self, x: Tensor, counts: Sequence[int]) -> ExpertLayout: ...

    def forward_laid_out(self, x_in: Tensor, layout: ExpertLayout) -> Tensor: ...


def sort_by_expert(routing: Routing) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """The kept (input, expert) assignments sorted by expert: (input rows, expert ids,
    weights, counts per expert)."""
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
    counts = torch.bincount(flat_expert, minlength=routing.num_experts).tolist()
    return flat_input[order], flat_expert[order], flat_weight[order], counts


def run_experts(
    experts: Sequence[nn.Module] | GroupedExperts, x_sorted: Tensor, counts: list[int]
) -> Tensor:
    """Expert e on its block of ``counts[e]`` rows of ``x_sorted``; outputs in the same order."""
    if isinstance(experts, GroupedExperts):
        return experts.forward_grouped(x_sorted, counts)
    blocks = zip(experts, x_sorted.split(counts), counts, strict=True)
    return torch.cat([expert(block) for expert, block, c in blocks if c > 0])


def dispatch_combine(
    x: Tensor,
    routing: Routing,
    experts: Sequence[nn.Module] | GroupedExperts,
    transform: Callable[[Tensor], Tensor] | None = None,
    record_predictions: bool = False,
) -> Tensor:
    """y[n] = Σ_j weights[n, j] · transform(experts[indices[n, j]](x[n])).

    Each expert runs once on the block of inputs routed to it; ``transform`` (e.g. softmax)
    is applied to each expert's output before mixing. A Soft MoE record goes to
    :func:`soft_dispatch_combine`. With ``record_predictions`` (experts that are classifiers)
    each kept assignment's predicted class is stored in ``routing.expert_predictions``.
    """
    if routing.is_soft:
        return soft_dispatch_combine(x, routing, experts, transform)
    rows, expert_ids, weights, counts = sort_by_expert(routing)
    if rows.numel() == 0:
        raise RuntimeError("no input was routed to any expert")
    laid_out = isinstance(experts, LaidOutExperts)
    layout = experts.layout(x, counts) if laid_out else ExpertLayout.contiguous(counts)
    # padding rows of the layout repeat a real row of their expert with weight 0: they add
    # exactly nothing to the output or to any gradient
    rows_in, weights_in = layout.place(rows), layout.pad(weights)
    # index_select, not x[rows]: its backward is an index_add_, where advanced indexing's is
    # an accumulating index_put_, which is slower
    x_in = x.index_select(0, rows_in)
    out = experts.forward_laid_out(x_in, layout) if laid_out else run_experts(experts, x_in, counts)
    if record_predictions:
        routing.expert_predictions = (rows, expert_ids, layout.unpad(out).detach().argmax(-1))
    if transform is not None:
        out = transform(out)
    out = out * weights_in.view(-1, *([1] * (out.dim() - 1))).to(out.dtype)
    return out.new_zeros((x.shape[0], *out.shape[1:])).index_add_(0, rows_in, out)


def soft_dispatch_combine(
    x: Tensor,
    routing: Routing,
    experts: Sequence[nn.Module] | GroupedExperts,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Soft MoE (Puigcerver et al. 2023): slots = Dᵀx, y = C · transform(expert(slot)).

    ``routing.dispatch``/``combine`` are [N, E, S]; the N inputs form ``routing.groups``
    consecutive groups, each with its own slots. Slot (g, e, s) reads Σ_{n in g} D[n, e, s]·x[n]
    (any per-input shape, e.g. whole images), expert e runs once on its G·S slots, and
    y[n] = Σ_{e,s} C[n, e, s]·out[g(n), e, s]. Inputs of one group are mixed with each other.
    """
    n, e, s = routing.dispatch.shape
    g = routing.groups
    dispatch = routing.dispatch.reshape(g, n // g, e * s).to(x.dtype)
    slots = dispatch.transpose(1, 2) @ x.reshape(g, n // g, -1)  # [G, E·S, F]
    slots = slots.view(g, e, s, -1).transpose(0, 1).reshape(e * g * s, *x.shape[1:])
    out = run_experts(experts, slots, [g * s] * e)
    if transform is not None:
        out = transform(out)
    out_shape = out.shape[1:]
    out = out.reshape(e, g, s, -1).transpose(0, 1).reshape(g, e * s, -1)  # back to per group
    combine = routing.combine.reshape(g, n // g, e * s).to(out.dtype)
    return (combine @ out).view(n, *out_shape)


class MoE(nn.Module):
    """Router + experts + regularizers. ``forward`` returns (output, routing record).

    The router reads ``router_input`` when given (e.g. a separate gating network's features)
    and ``x`` otherwise; the experts always read ``x``. ``record_predictions``: the experts
    are classifiers, so record each one's predicted class (for per-expert accuracy).
    Regularizers that declare ``needs_experts`` are handed this layer's experts.
    """

    def __init__(
        self,
        router: nn.Module,
        experts: Sequence[nn.Module] | GroupedExperts,
        regularizers: Mapping[str, Regularizer] | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
        record_predictions: bool = False,
    ) -> None:
        super().__init__()
        self.record_predictions = record_predictions
        grouped = isinstance(experts, GroupedExperts)
        count = experts.num_experts if grouped else len(experts)
        if count != router.num_experts:
            raise ValueError(
                f"router has {router.num_experts} outputs but {count} experts were given"
            )
        self.router = router
        self.experts = experts if grouped else nn.ModuleList(experts)
        self.regularizers = nn.ModuleDict(dict(regularizers or {}))
        for reg in self.regularizers.values():  # e.g. tree balance: a penalty of the experts
            if reg.needs_experts:
                reg.attach(self.experts if grouped else list(self.experts))
        self.transform = transform

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    def combine(self, x: Tensor, routing: Routing) -> Tensor:
        """The experts' outputs for ``routing`` (made here or by a strategy), mixed by weight."""
        return dispatch_combine(x, routing, self.experts, self.transform, self.record_predictions)

    def expert_outputs(self, x: Tensor) -> Tensor:
        """Every expert's raw output on every input, [N, E, C] (dense: for EM and gate targets)."""
        return torch.stack([expert(x) for expert in self.experts], dim=1)

    def forward(self, x: Tensor, router_input: Tensor | None = None) -> tuple[Tensor, Routing]:
        routing = self.router(x if router_input is None else router_input)
        y = self.combine(x, routing)
        # a gate may return a loss of its own with its decision (ReLU routing's L1 penalty)
        routing.aux_losses = {
            **routing.aux_losses,
            **{
                name: reg.weight * reg(routing)
                for name, reg in self.regularizers.items()
                if reg.weight > 0
            },
        }
        return y, routing
