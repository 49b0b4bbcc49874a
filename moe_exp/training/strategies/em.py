"""EM training (Jordan & Jacobs 1994, "Hierarchical mixtures of experts and the EM algorithm").

Per batch, the E-step (no grad) takes posteriors h_i ∝ g_i(x) · p_i(y | x) over experts, g
the router's dense softmax; the M-step takes ``em_steps`` gradient steps on the same batch
of Σ_i h_i · (−log p_i(y|x)) (experts) plus −Σ_i h_i log g_i(x) (gate): generalised EM, as is
usual for neural experts. It needs every expert's likelihood, so it is dense by nature.
``schedule=batch`` steps both sides every batch (incremental EM, Neal & Hinton 1998);
``schedule=epoch`` alternates experts-only and gate-only epochs (ECM, Meng & Rubin 1993).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_exp.moe.rules import Composition, require
from moe_exp.training.strategies.staged import (
    Stage,
    StagedStrategy,
    log_train_step,
    record_chosen,
)

SCHEDULES = ("batch", "epoch")


def schedule_problems(schedule: Any) -> list[str]:
    if schedule in SCHEDULES:
        return []
    return [
        f"strategy.schedule={schedule!r} is not one of {', '.join(SCHEDULES)} "
        "(batch: E-step and M-step every batch; epoch: experts and gate epochs alternate)"
    ]


def em_posteriors(gate_log_probs: Tensor, expert_log_lik: Tensor) -> Tensor:
    """E-step: h_i = g_i p_i(y|x) / Σ_j g_j p_j(y|x), from log g [N, E] and log p_i(y|x) [N, E]."""
    return torch.softmax(gate_log_probs + expert_log_lik, dim=-1)


class EMStrategy(StagedStrategy):
    """EM (Jordan & Jacobs 1994): posteriors h ∝ g·p(y|x) (E-step), then posterior-weighted
    NLL for the experts and cross-entropy to h for the gate (M-step), ``em_steps`` per batch.

    ``schedule="batch"``: both M-steps on every batch (one optimiser, stage ``em``);
    ``schedule="epoch"``: epochs alternate experts-only (stage ``em_experts``) and gate-only
    (``em_gate``) M-steps, starting with the experts, each side with its own optimiser and
    the other side frozen."""

    strategy = "em"
    use_router_lr = True
    stage_checkpoints = False

    @classmethod
    def config_problems(cls, args: Mapping[str, Any], run: Composition) -> list[str]:
        return super().config_problems(args, run) + schedule_problems(args.get("schedule"))

    def __init__(
        self,
        em_steps: int = 1,
        epochs: int | None = None,
        lr: float | None = None,
        schedule: str = "batch",
    ) -> None:
        require(schedule_problems(schedule))
        self.steps_per_batch = em_steps
        self._epochs, self._lr, self.schedule = epochs, lr, schedule
        super().__init__([])

    def attach(self, trainer: Any, module: Any, datamodule: Any) -> None:
        epochs = self._epochs or trainer.max_epochs
        lr = self._lr or module.lr
        if self.schedule == "batch":
            self.stages = [Stage("all", epochs, lr, name="em")]
        else:
            sides = ("experts", "gate")
            self.stages = [
                Stage(sides[i % 2], 1, lr, name=f"em_{sides[i % 2]}") for i in range(epochs)
            ]
        super().attach(trainer, module, datamodule)

    def optimizer_slots(self) -> list[int]:
        """Batch schedule: one optimiser; epoch schedule: one for the experts, one for the
        gate, each carrying its state (and schedule) across that side's epochs."""
        return [0 if s.train in ("all", "experts") else 1 for s in self.stages]

    def losses(self, batch: Sequence[Tensor], h: Tensor | None = None) -> tuple:
        x, y, _ = batch
        model = self.model
        routing = model.route(x)
        log_g = routing.log_probs()  # all experts
        z = model.expert_logits(x)
        log_lik = F.log_softmax(z, -1).gather(-1, y[:, None, None].expand(-1, z.shape[1], 1))
        log_lik = log_lik.squeeze(-1)  # [N, E] log p_i(y|x)
        if h is None:  # E-step, from the current model (no grad)
            h = em_posteriors(log_g.detach(), log_lik.detach())
        expert_loss = -(h * log_lik).sum(-1).mean()
        gate_loss = -(h * log_g).sum(-1).mean()
        return routing, z, log_g, h, expert_loss, gate_loss

    def training_step(self, module: Any, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        # With em_steps=1 the E-step reuses the M-step's forward pass (detached): the same
        # numbers as a separate no-grad pass over the same model state.
        self.set_modes(module)
        side = self.stages[self.current].train
        h = None
        for _ in range(self.steps_per_batch):
            routing, z, log_g, h, expert_loss, gate_loss = self.losses(batch, h)
            loss = {"all": expert_loss + gate_loss, "experts": expert_loss, "gate": gate_loss}
            loss = loss[side]
            self.step(module, loss)
        with torch.no_grad():
            log_probs = self.model.mix_log_probs(z, log_g.exp(), batch[0])
        record_chosen(routing, z.detach())
        log_train_step(
            module,
            loss,
            log_probs,
            batch,
            routing,
            em_expert_nll=expert_loss,
            em_gate_ce=gate_loss,
        )
        return loss.detach()
