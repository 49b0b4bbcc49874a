"""The cost side of the efficiency claim: FLOPs per input, active vs all-experts.

FLOPs are counted by torch's FlopCounterMode on a real forward pass, so they are what the
sparse dispatch actually executed. The experts' share of each MoE layer is the layer's
FLOPs minus its router's; a dense model with the same parameters would run every expert on
every input, i.e. E / k_eff times that share (k_eff = assignments per routed input).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from moe_exp.moe import MoE


@torch.no_grad()
def count_flops(model: nn.Module, x: Tensor) -> tuple[FlopCounterMode, Any]:
    """One forward pass of ``model`` on ``x`` in eval mode under a FLOP counter: (counter,
    output). The training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            out = model(x)
    finally:
        model.train(was_training)
    return counter, out


def flops_per_sample(model: nn.Module, x: Tensor) -> dict[str, float]:
    """Forward FLOPs per input: ``flops_active`` (measured) and ``flops_dense_equal_params``."""
    counter, (_, routings) = count_flops(model, x)
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    layers = [name for name, m in model.named_modules() if isinstance(m, MoE)]
    total = float(counter.get_total_flops())
    dense = total
    for name, routing in zip(layers, routings, strict=False):
        key = f"{root}.{name}" if name else root
        experts = by_module.get(key, 0) - by_module.get(f"{key}.router", 0)
        routed = max(routing.indices.shape[0], 1)
        k_eff = float(routing.experts_per_input().sum()) / routed
        if k_eff > 0:
            dense += experts * (routing.num_experts / k_eff - 1.0)
    n = x.shape[0]
    return {"flops_active": total / n, "flops_dense_equal_params": dense / n}
