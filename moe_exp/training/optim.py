"""The optimiser's side of training, without Lightning: which parameters route (they may get
their own learning rate and weight decay) and the per-step learning-rate schedules."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_exp.moe.layer import MoE


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routing side of a model: a separate gating network (``gate_encoder``) and the
    router of every MoE layer. Everything else (experts, backbone, head) is the rest."""
    params: list[nn.Parameter] = []
    encoder = getattr(model, "gate_encoder", None)
    if isinstance(encoder, nn.Module):
        params += list(encoder.parameters())
    for module in model.modules():
        if isinstance(module, MoE):
            params += list(module.router.parameters())
    return params


def adamw(groups: list[dict[str, Any]]) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over ``groups``, fused into one kernel per step where
    every parameter's device supports it: on the CPU torch otherwise updates one tensor at a
    time, and a mixture has many small ones (a weight and a bias per expert and layer)."""
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, fused=fused or None)


def make_schedule(kind: str, optimizer: torch.optim.Optimizer, steps: int) -> Any:
    """The per-step learning-rate schedule (None for ``none``); one-cycle peaks at each
    group's own lr (Smith & Topin 2017, "Super-convergence")."""
    steps = max(int(steps), 1)
    if kind == "none":
        return None
    if kind == "onecycle":
        peaks = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=steps)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    raise ValueError(f"unknown scheduler {kind!r}")
