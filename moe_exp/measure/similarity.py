"""Are the experts different? Linear CKA between every pair of experts' outputs on the same
inputs (Kornblith et al. 2019), to catch experts that collapsed into copies of each other."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_exp.moe import MoE
from moe_exp.moe.layer import GroupedExperts
from moe_exp.moe.stats import linear_cka


def _all_expert_outputs(layer: MoE, x: Tensor) -> list[Tensor]:
    e = layer.num_experts
    if isinstance(layer.experts, GroupedExperts):
        n = x.shape[0]
        out = layer.experts.forward_grouped(x.repeat(e, *([1] * (x.dim() - 1))), [n] * e)
        return list(out.split(n))
    return [expert(x) for expert in layer.experts]


@torch.no_grad()
def expert_similarity(model: nn.Module, x: Tensor, max_inputs: int = 512) -> list[Tensor]:
    """One [E, E] CKA matrix per MoE layer, from that layer's real inputs on batch ``x``."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    captured: dict[int, Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, i=i: captured.setdefault(i, args[0].detach())
        )
        for i, layer in enumerate(layers)
    ]
    was_training = model.training
    model.eval()
    try:
        model(x)
        matrices = []
        for i, layer in enumerate(layers):
            inputs = captured[i][:max_inputs]
            outs = [o.flatten(1) for o in _all_expert_outputs(layer, inputs)]
            e = len(outs)
            cka = torch.eye(e, dtype=torch.float64)
            for a in range(e):
                for b in range(a + 1, e):
                    cka[a, b] = cka[b, a] = linear_cka(outs[a], outs[b])
            matrices.append(cka)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return matrices


def similarity_summary(matrices: list[Tensor]) -> dict[str, float]:
    """Mean and max CKA over distinct expert pairs, over all layers."""
    off = [m[~torch.eye(m.shape[0], dtype=torch.bool)] for m in matrices if m.shape[0] > 1]
    if not off:
        return {}
    values = torch.cat(off)
    return {"expert_cka_mean": float(values.mean()), "expert_cka_max": float(values.max())}
