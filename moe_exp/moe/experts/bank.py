"""Grouped experts: E same-shaped MLPs with stacked weights, computed in one call.

The layer asks the bank where each expert's rows go (:meth:`MLPExpertBank.layout`), gathers
the routed inputs straight into that buffer and calls :meth:`MLPExpertBank.forward_laid_out`
(the ``LaidOutExperts`` protocol of :mod:`moe_exp.moe.layer`); ``forward_grouped`` takes
inputs already sorted by expert (the plain ``GroupedExperts`` protocol).

One autograd Function per linear layer (:class:`GroupedLinear`) writes each block into
preallocated outputs and gradients with ``out=`` products: no per-expert autograd nodes, no
``cat`` of blocks and no ``stack`` of per-expert weight gradients. On a multi-threaded CPU,
experts with few rows run in pairs of similar row counts (:class:`ExpertLayout`), one ``bmm``
per pair, because the BLAS spreads one product of few rows poorly over its threads. Experts
are not all padded to the largest block: under uneven routing most padded rows would be
wasted FLOPs. ``benchmarks/bench_layer.py`` compares the layer with a dense MLP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from moe_exp.moe.experts.dense import check_dropout
from moe_exp.moe.layout import ExpertLayout, Group

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
PAIR_BELOW_ROWS = 1024  # mean rows per routed expert under which experts run in pairs


def _batch_of(t: Tensor, experts: tuple[int, ...], transposed: bool = False) -> Tensor:
    """t[experts] as one view (batch stride = their distance), not a copy: experts ascending;
    ``transposed`` swaps the last two dimensions. One ``as_strided`` call: the loop over
    groups makes a view per group and layer at every step, so per-call overhead adds up."""
    stride = (experts[-1] - experts[0]) * t.stride(0) or t.stride(0)
    shape, strides = list(t.shape[1:]), list(t.stride()[1:])
    if transposed:
        shape, strides = shape[::-1], strides[::-1]
    offset = t.storage_offset() + experts[0] * t.stride(0)
    return t.as_strided((len(experts), *shape), (stride, *strides), offset)


def _blocks(t: Tensor, first: int, count: int, rows: int, transposed: bool = False) -> Tensor:
    """Rows [first, first + count·rows) of the contiguous 2-D ``t`` as [count, rows, cols]
    (``transposed``: [count, cols, rows]), as one view."""
    cols = t.shape[1]
    shape, strides = (count, rows, cols), (rows * cols, cols, 1)
    if transposed:
        shape, strides = (count, cols, rows), (rows * cols, 1, cols)
    return t.as_strided(shape, strides, t.storage_offset() + first * cols)


class GroupedLinear(torch.autograd.Function):
    """y[rows of expert e] = x[rows of expert e] · W[e] + b[e], rows placed by an
    :class:`ExpertLayout`'s groups.

    ``weight`` is [E, d_in, d_out] and ``bias`` [E, d_out], both contiguous. Each group's
    product is written into preallocated outputs and gradients (``out=``): no per-expert
    autograd nodes, ``cat`` of blocks or ``stack`` of per-expert weight gradients. Padding
    rows of the output hold bias values; their gradient must be zero (the layout's
    ``positions`` gather guarantees it). Differentiable once (no double backward).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, groups: list[Group]) -> Tensor:
        x = x.contiguous()
        out = x.new_empty(x.shape[0], weight.shape[2])
        bias_rows = bias.unsqueeze(1)  # [E, 1, d_out]: broadcast over each block's rows
        for experts, rows, first in groups:
            g = len(experts)
            torch.baddbmm(
                _batch_of(bias_rows, experts),
                _blocks(x, first, g, rows),
                _batch_of(weight, experts),
                out=_blocks(out, first, g, rows),
            )
        ctx.groups = groups
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        gx = torch.empty_like(x) if need_x else None  # the groups cover every row
        gw = torch.empty_like(weight) if need_w else None
        gb = grad.new_empty(weight.shape[0], weight.shape[2]) if need_b else None
        for experts, rows, first in ctx.groups:
            g = len(experts)
            g_out = _blocks(grad, first, g, rows)
            if gx is not None:
                w_t = _batch_of(weight, experts, transposed=True)
                torch.bmm(g_out, w_t, out=_blocks(gx, first, g, rows))
            if gw is not None:
                x_t = _blocks(x, first, g, rows, transposed=True)
                torch.bmm(x_t, g_out, out=_batch_of(gw, experts))
            if gb is not None:
                torch.sum(g_out, 1, out=_batch_of(gb, experts))
        routed = {e for experts, _, _ in ctx.groups for e in experts}
        for e in set(range(weight.shape[0])) - routed:  # experts with no rows
            for g in (gw, gb):
                if g is not None:
                    g[e].zero_()
        return gx, gw, gb, None


def grouped_linear(
    x: Tensor, weight: Tensor, bias: Tensor, counts: Sequence[int] | ExpertLayout
) -> Tensor:
    """Per-expert affine maps of row blocks: sorted by expert (``counts`` rows each) or placed
    by a layout (see :class:`GroupedLinear`)."""
    if x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [rows, {weight.shape[1]}], got {list(x.shape)}")
    layout = counts if isinstance(counts, ExpertLayout) else ExpertLayout.contiguous(counts)
    if layout.rows != x.shape[0]:
        raise ValueError(f"counts sum to {layout.rows} but x has {x.shape[0]} rows")
    if not isinstance(counts, ExpertLayout) and len(counts) != weight.shape[0]:
        raise ValueError(f"{len(counts)} counts for {weight.shape[0]} experts")
    # under autocast the input may be lower precision than the parameters: compute in its dtype
    weight, bias = weight.to(x.dtype).contiguous(), bias.to(x.dtype).contiguous()
    return GroupedLinear.apply(x, weight, bias, layout.groups)


class MLPExpertBank(nn.Module):
    """E two-layer MLP experts (d_in → d_hidden → d_out) with stacked weights.

    ``forward_grouped(x_sorted, counts)`` runs expert e on its block of rows; ``expert_forward``
    runs one expert on any input (a reference, and for use outside a mixture). Weights are
    initialised like ``nn.Linear``'s. ``dropout`` applies to the hidden units.
    """

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        d_hidden: int,
        d_out: int,
        activation: str = "gelu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {', '.join(ACTIVATIONS)}")
        self.num_experts = num_experts
        self.d_in, self.d_hidden, self.d_out = d_in, d_hidden, d_out
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.drop = nn.Dropout(check_dropout(dropout))
        self.w1 = nn.Parameter(torch.empty(num_experts, d_in, d_hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, d_hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_hidden, d_out))
        self.b2 = nn.Parameter(torch.empty(num_experts, d_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1 / math.sqrt(w.shape[1])  # nn.Linear's default: U(±1/√fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward_grouped(self, x_sorted: Tensor, counts: Sequence[int]) -> Tensor:
        layout = self.layout(x_sorted, counts)
        return layout.unpad(self.forward_laid_out(layout.place(x_sorted), layout))

    def forward_laid_out(self, x_in: Tensor, layout: ExpertLayout) -> Tensor:
        """The experts on rows already placed by ``layout`` (see :meth:`layout`); the output
        has the same rows. Padding rows must get zero gradient."""
        h = self.act(grouped_linear(x_in, self.w1, self.b1, layout))
        return grouped_linear(self.drop(h), self.w2, self.b2, layout)

    def layout(self, x: Tensor, counts: Sequence[int]) -> ExpertLayout:
        """Pairs of experts (see :class:`ExpertLayout`) on a multi-threaded CPU when blocks
        are small, else one matmul per expert: from 1024 rows per expert a block keeps the
        threads busy alone and padding only costs, and a GPU runs small products back to back
        at full speed."""
        if len(counts) != self.num_experts:
            raise ValueError(f"{len(counts)} counts for {self.num_experts} experts")
        routed = sum(1 for c in counts if c)
        small = sum(counts) < PAIR_BELOW_ROWS * routed
        if small and x.device.type == "cpu" and torch.get_num_threads() > 1:
            return ExpertLayout.paired(counts, x.device)
        return ExpertLayout.contiguous(counts)

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        h = self.drop(self.act(torch.addmm(self.b1[e], x, self.w1[e])))
        return torch.addmm(self.b2[e], h, self.w2[e])

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_in={self.d_in}, d_hidden={self.d_hidden}, "
            f"d_out={self.d_out}, activation={self.activation}"
        )
