"""Soft MoE (Puigcerver et al. 2023): experts see convex mixtures of inputs in slots."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_exp.moe.gates.router import Router
from moe_exp.moe.routing import Routing


class SoftMoEGate(Router):
    """Soft MoE (Puigcerver et al. 2023, "From sparse to soft mixtures of experts").

    Logits L = h·Φ over E·S slots (S = ``slots_per_expert``). Dispatch weights are the
    softmax of L over the inputs (per slot): each slot's input is a convex combination of
    inputs. Combine weights are the softmax of L over all slots (per input): each output
    mixes all slot outputs. So inputs are mixed with each other, in training and evaluation
    alike (that is the method). By default the whole batch is one group (whole images get
    mixed); ``group_size`` = T splits the N inputs into consecutive groups of T (e.g. one
    image's tokens, as in the paper), each with its own E·S slots, mixing only within a group.
    The record's ``weights``/``probs`` are the combine weights summed per expert, ``load``
    and importance are their sums over the batch. ``k`` is E: every expert sees every input.
    """

    example_args = {"slots_per_expert": 2}

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        slots_per_expert: int = 1,
        group_size: int | None = None,
    ) -> None:
        super().__init__(in_features, num_experts, num_experts, linear=False)
        if slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be >= 1, got {slots_per_expert}")
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be >= 1 or None, got {group_size}")
        self.slots_per_expert = slots_per_expert
        self.group_size = group_size
        self.proj = nn.Linear(in_features, num_experts * slots_per_expert, bias=False)

    def forward(self, h: Tensor) -> Routing:
        n, e, s = h.shape[0], self.num_experts, self.slots_per_expert
        t = self.group_size or n
        if n % t:
            raise ValueError(f"{n} inputs do not split into groups of group_size={t}")
        slot_logits = self.proj(h).view(n, e, s)
        dispatch = slot_logits.view(n // t, t, e, s).softmax(1).view(n, e, s)
        combine = slot_logits.reshape(n, e * s).softmax(-1).view(n, e, s)
        probs = combine.sum(-1)  # == softmax(logits) below
        indices = torch.arange(e, device=h.device).expand(n, e)
        return Routing(
            logits=slot_logits.logsumexp(-1),
            probs=probs,
            weights=probs,
            indices=indices,
            dispatch=dispatch,
            combine=combine,
            groups=n // t,
        )
