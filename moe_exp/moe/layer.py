"""The MoE layer: route, dispatch each input to its chosen experts only, combine.

Sparse compute: the (input, expert) assignments are sorted by expert and each expert runs
once on the contiguous block of inputs routed to it, so the cost grows with k, not with E.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from moe_exp.moe.balance import Regularizer
from moe_exp.moe.routing import Routing


def dispatch_combine(
    x: Tensor,
    routing: Routing,
    experts: Sequence[nn.Module],
    transform=None,
) -> Tensor:
    """y[n] = Σ_j weights[n, j] · transform(experts[indices[n, j]](x[n])).

    ``transform`` (e.g. softmax) is applied to each expert's output before mixing.
    """
    n, k = routing.indices.shape
    flat_expert = routing.indices.reshape(-1)
    flat_weight = routing.weights.reshape(-1)
    flat_input = torch.arange(n, device=x.device).repeat_interleave(k)
    keep = flat_expert >= 0  # capacity-dropped assignments carry index -1
    if not bool(keep.all()):
        flat_expert, flat_weight, flat_input = (
            flat_expert[keep],
            flat_weight[keep],
            flat_input[keep],
        )
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=len(experts)).tolist()
    inputs_sorted = flat_input[order].split(counts)
    weights_sorted = flat_weight[order].split(counts)
    outputs, targets = [], []
    for expert, rows, w in zip(experts, inputs_sorted, weights_sorted, strict=True):
        if rows.numel() == 0:
            continue
        out = expert(x[rows])
        if transform is not None:
            out = transform(out)
        outputs.append(out * w.unsqueeze(-1).to(out.dtype))
        targets.append(rows)
    if not outputs:
        raise RuntimeError("no input was routed to any expert")
    stacked = torch.cat(outputs)
    y = stacked.new_zeros((n, *stacked.shape[1:]))
    return y.index_add_(0, torch.cat(targets), stacked)


class MoE(nn.Module):
    """Router + experts + regularizers. ``forward`` returns (output, routing record).

    The router reads ``router_input`` when given (e.g. a separate gating network's features)
    and ``x`` otherwise; the experts always read ``x``.
    """

    def __init__(
        self,
        router: nn.Module,
        experts: Sequence[nn.Module],
        regularizers: Mapping[str, Regularizer] | None = None,
        transform=None,
    ) -> None:
        super().__init__()
        if len(experts) != router.num_experts:
            raise ValueError(
                f"router has {router.num_experts} outputs but {len(experts)} experts were given"
            )
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.regularizers = nn.ModuleDict(dict(regularizers or {}))
        self.transform = transform

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, x: Tensor, router_input: Tensor | None = None) -> tuple[Tensor, Routing]:
        routing = self.router(x if router_input is None else router_input)
        y = dispatch_combine(x, routing, self.experts, self.transform)
        routing.aux_losses = {
            name: reg.weight * reg(routing)
            for name, reg in self.regularizers.items()
            if reg.weight > 0
        }
        return y, routing
