"""The LightningModule: cross-entropy plus the routers' weighted aux losses, accuracy, and
per-epoch utilisation of every MoE layer, computed from the routing records."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from moe_exp.errors import DivergedError
from moe_exp.moe import Routing, RoutingStats

SPLITS = ("train", "val", "test")


class MoEClassifierModule(L.LightningModule):
    """Wraps a model whose forward returns (log-probabilities, [routing per MoE layer])."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        num_experts: int,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        scheduler: str = "onecycle",
    ) -> None:
        super().__init__()
        self.model = model
        self.num_experts = num_experts
        self.lr, self.weight_decay, self.scheduler = lr, weight_decay, scheduler
        self.accuracy = nn.ModuleDict(
            {f"acc_{s}": MulticlassAccuracy(num_classes, average="micro") for s in SPLITS}
        )
        self.routing_stats: dict[str, list[RoutingStats]] = {s: [] for s in SPLITS}

    def forward(self, x: Tensor) -> tuple[Tensor, list[Routing]]:
        return self.model(x)

    # -- steps ----------------------------------------------------------------------------
    def _step(self, batch: tuple[Tensor, Tensor, Tensor], split: str) -> Tensor:
        x, y, _ = batch
        log_probs, routings = self.model(x)
        ce = F.nll_loss(log_probs, y)
        aux: dict[str, Tensor] = {}
        for routing in routings:
            for name, value in routing.aux_losses.items():
                aux[name] = aux.get(name, 0.0) + value
        loss = ce + sum(aux.values(), torch.zeros((), device=ce.device))
        if split == "train" and not torch.isfinite(loss):
            raise DivergedError(
                f"Training diverged: the loss became {loss.item()} at epoch {self.current_epoch}, "
                f"step {self.global_step} (cross-entropy {ce.item()}). Lower optim.lr "
                "(or raise the balance weights' stability) and run again."
            )
        n = y.shape[0]
        log = dict(on_step=False, on_epoch=True, batch_size=n)
        self.log(f"{split}/loss", loss, prog_bar=split != "train", **log)
        self.log(f"{split}/ce", ce, **log)
        for name, value in aux.items():
            self.log(f"{split}/aux_{name}", value, **log)
        accuracy = self.accuracy[f"acc_{split}"]
        accuracy(log_probs.detach(), y)
        self.log(f"{split}/acc", accuracy, prog_bar=True, **log)
        self._track(split, routings)
        return loss

    def training_step(self, batch, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    # -- utilisation ----------------------------------------------------------------------
    def _track(self, split: str, routings: list[Routing]) -> None:
        stats = self.routing_stats[split]
        while len(stats) < len(routings):
            stats.append(RoutingStats(routings[len(stats)].num_experts))
        for tracker, routing in zip(stats, routings, strict=True):
            tracker.update(routing)

    def utilisation(self, split: str) -> dict[str, float]:
        """Balance metrics of the epoch so far; keys get a layer prefix when there are several."""
        stats = self.routing_stats[split]
        out: dict[str, float] = {}
        for i, tracker in enumerate(stats):
            prefix = f"layer{i}/" if len(stats) > 1 else ""
            out.update({f"{prefix}{k}": v for k, v in tracker.compute().items()})
        return out

    def _log_utilisation(self, split: str) -> None:
        values = self.utilisation(split)
        if values:
            self.log_dict({f"{split}/{k}": v for k, v in values.items()}, on_epoch=True)
        self.last_utilisation = {**getattr(self, "last_utilisation", {}), split: values}
        for tracker in self.routing_stats[split]:
            tracker.reset()

    def on_train_epoch_end(self) -> None:
        self._log_utilisation("train")

    def on_validation_epoch_end(self) -> None:
        self._log_utilisation("val")

    def on_test_epoch_end(self) -> None:
        self._log_utilisation("test")

    # -- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.scheduler == "none":
            return optimizer
        if self.scheduler == "onecycle":
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=self.lr, total_steps=self.trainer.estimated_stepping_batches
            )
        elif self.scheduler == "cosine":
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=self.trainer.estimated_stepping_batches
            )
        else:
            raise ValueError(f"unknown scheduler {self.scheduler!r}")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
