"""Hierarchical (staged) training: divide the data first, learn to route afterwards.

As partition-based mixtures do (e.g. Collobert, Bengio & Bengio 2002): (1) each expert learns
its own part of the training data (a k-means, random or latent-attribute partition; the gate
is not used); (2) the gate learns, experts frozen, to send each input to the expert with the
lowest loss on it (hard argmin target, or softmax(−loss/τ)); (3) joint fine-tuning. Balance
regularizers apply only in ``all`` stages: in a gate stage they would fight the targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_exp.errors import ConfigError
from moe_exp.moe import Routing
from moe_exp.moe.rules import Composition
from moe_exp.training.strategies.partition import Partition, attribute_problems
from moe_exp.training.strategies.staged import (
    Stage,
    StagedStrategy,
    log_train_step,
    record_chosen,
)

GATE_TARGETS = ("hard", "soft")


class HierarchicalStrategy(StagedStrategy):
    """Staged training: experts on their partition → gate towards the best expert → all."""

    strategy = "hierarchical"

    @classmethod
    def config_problems(cls, args: Mapping[str, Any], run: Composition) -> list[str]:
        """The staged rules, and an attribute the data class declares
        (``discrete_latents_for``), checked before the data is built."""
        problems = super().config_problems(args, run)
        declared = getattr(run.targets.get("data"), "discrete_latents_for", None)
        if args.get("partition") == "attribute" and callable(declared):
            available = declared(run.args.get("data", {}).get("label_noise"))
            problems += attribute_problems(args.get("attribute"), available)
        return problems

    def __init__(
        self,
        stages: Sequence[Mapping[str, Any]],
        partition: str = "kmeans",
        attribute: str | None = None,
        projection: int = 0,
        kmeans_iters: int = 10,
        gate_target: str = "hard",
        gate_temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        if not stages:
            raise ConfigError("strategy.stages is empty: give at least one stage")
        super().__init__([Stage(**dict(s)) for s in stages])
        if gate_target not in GATE_TARGETS:
            raise ConfigError(
                f"strategy.gate_target={gate_target!r} is not one of {', '.join(GATE_TARGETS)}"
            )
        self.partition_kind, self.attribute = partition, attribute
        self.projection, self.kmeans_iters, self.seed = projection, kmeans_iters, seed
        self.gate_target, self.gate_temperature = gate_target, gate_temperature
        self.partition: Partition | None = None

    def attach(self, trainer: Any, module: Any, datamodule: Any) -> None:
        super().attach(trainer, module, datamodule)
        if any(s.train == "experts" for s in self.stages):
            self.partition = Partition(
                self.partition_kind,
                self.model.moe.num_experts,
                self.seed,
                self.attribute,
                self.projection,
                self.kmeans_iters,
            ).fit(datamodule, module.latents)

    def training_step(self, module: Any, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        self.set_modes(module)
        kind = self.stages[self.current].train
        if kind == "all":
            loss = module.step_batch(batch, "train")
        elif kind == "experts":
            loss = self._experts_step(module, batch)
        else:
            loss = self._gate_step(module, batch)
        self.step(module, loss)
        return loss.detach()

    def _experts_step(self, module: Any, batch: Sequence[Tensor]) -> Tensor:
        """Each input goes to its part's expert only; the gate is not used."""
        x, y, latents = batch
        model = self.model
        part = self.partition(x, latents)
        e = model.moe.num_experts
        one_hot = F.one_hot(part, e).to(x.dtype)
        routing = Routing(
            logits=one_hot,
            probs=one_hot,
            weights=torch.ones_like(part, dtype=x.dtype)[:, None],
            indices=part[:, None],
        )
        log_probs = model.routed_log_probs(x, routing)
        loss = F.nll_loss(log_probs, y)
        log_train_step(module, loss, log_probs, batch, routing)
        return loss

    def gate_targets(self, expert_nll: Tensor) -> Tensor:
        """Target distribution over experts from per-expert losses [N, E]."""
        if self.gate_target == "hard":
            return F.one_hot(expert_nll.argmin(-1), expert_nll.shape[-1]).to(expert_nll.dtype)
        return torch.softmax(-expert_nll / self.gate_temperature, dim=-1)

    def _gate_step(self, module: Any, batch: Sequence[Tensor]) -> Tensor:
        """Experts frozen: the router learns to pick the expert with the lowest loss."""
        x, y, _ = batch
        model = self.model
        with torch.no_grad():
            z = model.expert_logits(x)  # [N, E, C]
            nll = -F.log_softmax(z, -1).gather(-1, y[:, None, None].expand(-1, z.shape[1], 1))
            target = self.gate_targets(nll.squeeze(-1))
        routing = model.route(x)
        loss = -(target * routing.log_probs()).sum(-1).mean()
        with torch.no_grad():
            log_probs = model.mix_log_probs(z, routing.gates(), x)
        record_chosen(routing, z)
        log_train_step(module, loss, log_probs, batch, routing, gate_ce=loss)
        return loss
