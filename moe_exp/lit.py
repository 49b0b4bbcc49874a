"""The LightningModule: cross-entropy plus the routers' weighted aux losses, accuracy, and
per-epoch utilisation and specialisation of every MoE layer, from the routing records."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from moe_exp.errors import DivergedError
from moe_exp.moe import Routing, RoutingStats

SPLITS = ("train", "val", "test")
EXAMPLES_PER_EXPERT = 8
EPOCH_LINE_VAL_KEYS = ("loss", "acc", "cv_load", "max_mean_load")
log = logging.getLogger("moe_exp")


class MoEClassifierModule(L.LightningModule):
    """Wraps a model whose forward returns (log-probabilities, [routing per MoE layer]).

    ``latents`` maps each discrete latent attribute to (column, number of values), so the
    routing can be compared with it (NMI, expert × attribute tables).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        num_experts: int,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        scheduler: str = "onecycle",
        latents: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.num_experts = num_experts
        self.latents = dict(latents or {})
        self.lr, self.weight_decay, self.scheduler = lr, weight_decay, scheduler
        self.accuracy = nn.ModuleDict(
            {f"acc_{s}": MulticlassAccuracy(num_classes, average="micro") for s in SPLITS}
        )
        self.means = nn.ModuleDict()  # "{split}__{name}" → MeanMetric, created on first use
        self.routing_stats: dict[str, list[RoutingStats]] = {s: [] for s in SPLITS}
        self.history: dict[str, list[dict[str, float]]] = {s: [] for s in SPLITS}
        self.test_tables: list[RoutingStats] = []
        self.examples: dict[int, list[Tensor]] = {}
        self._epoch_start = self._last_batch_end = 0.0
        self._epoch_samples = 0
        self.train_samples_per_s = float("nan")
        # Optional training plan (see moe_exp.strategies): when set, it owns the training step
        # and the optimisers (manual optimisation); ``stage`` names the current stage and is
        # logged as ``stage_index`` (and tagged as ``stage`` on the CSV rows by the strategy).
        self.plan: Any = None
        self.stage = ""
        self.stage_index = 0

    def forward(self, x: Tensor) -> tuple[Tensor, list[Routing]]:
        return self.model(x)

    # -- steps ----------------------------------------------------------------------------
    def _step(self, batch: tuple[Tensor, Tensor, Tensor], split: str) -> Tensor:
        x, y, latents = batch
        log_probs, routings = self.model(x)
        ce = F.nll_loss(log_probs, y)
        aux: dict[str, Tensor] = {}
        for routing in routings:
            for name, value in routing.aux_losses.items():
                aux[name] = aux.get(name, 0.0) + value
        loss = ce + sum(aux.values(), torch.zeros((), device=ce.device))
        if split == "train":
            self.check_finite(loss)
        values = {"loss": loss, "ce": ce, **{f"aux_{k}": v for k, v in aux.items()}}
        self.record_step(split, log_probs, y, values)
        self._track(split, routings, y, latents)
        if split == "test":
            self._keep_examples(x, routings[0])
        return loss

    def check_finite(self, loss: Tensor) -> None:
        """The divergence guard: a NaN or infinite training loss stops the run at once."""
        if not torch.isfinite(loss):
            stage = f" in stage {self.stage!r}" if self.stage else ""
            raise DivergedError(
                f"Training diverged{stage}: the loss became {loss.item()} at epoch "
                f"{self.current_epoch}, step {self.global_step}. Lower the learning rate "
                "(optim.lr, or the stage's lr) or the regularizer weights and run again."
            )

    def record_step(
        self, split: str, log_probs: Tensor, y: Tensor, values: Mapping[str, Tensor]
    ) -> None:
        """Accumulate a step's accuracy and scalar values; they are logged once per epoch.

        torchmetrics accumulates (and syncs across processes); a ``self.log`` per value and
        step cost ~1 ms each, over 10 % of a training step here.
        """
        self.accuracy[f"acc_{split}"].update(log_probs.detach(), y)
        for name, value in values.items():
            key = f"{split}__{name}"
            if key not in self.means:
                self.means[key] = MeanMetric().to(self.device)
            self.means[key].update(value.detach(), weight=y.shape[0])

    def _log_epoch_means(self, split: str) -> dict[str, float]:
        """Log (and return) the epoch's accuracy and mean step values, then reset them."""
        values: dict[str, float] = {}
        accuracy = self.accuracy[f"acc_{split}"]
        if accuracy.update_called:
            values["acc"] = float(accuracy.compute())
        accuracy.reset()
        for key, metric in self.means.items():
            name = key.split("__", 1)
            if name[0] == split and metric.update_called:
                values[name[1]] = float(metric.compute())
                metric.reset()
        for name, value in values.items():
            self.log(f"{split}/{name}", value, prog_bar=name in ("acc", "loss"))
        return values

    def training_step(self, batch, batch_idx: int) -> Tensor | None:
        if self.plan is not None:
            return self.plan.training_step(self, batch, batch_idx)
        return self._step(batch, "train")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._epoch_samples += batch[1].shape[0]
        self._last_batch_end = time.perf_counter()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    # -- utilisation ----------------------------------------------------------------------
    def _track(self, split: str, routings: list[Routing], y: Tensor, latents: Tensor) -> None:
        stats = self.routing_stats[split]
        while len(stats) < len(routings):
            e = routings[len(stats)].num_experts
            stats.append(RoutingStats(e, self.num_classes, self.latents))
        for tracker, routing in zip(stats, routings, strict=True):
            tracker.update(routing, y, latents if self.latents else None)

    @torch.no_grad()
    def _keep_examples(self, x: Tensor, routing: Routing) -> None:
        """A few test images per expert (by largest combine weight), for the routing grid."""
        if routing.indices.shape[0] != x.shape[0]:
            return  # token routing: an image has no single expert
        top = routing.gates().argmax(-1)
        for e in range(routing.num_experts):
            kept = self.examples.setdefault(e, [])
            need = EXAMPLES_PER_EXPERT - len(kept)
            if need > 0:
                kept.extend(x[top == e][:need].float().cpu())

    def utilisation(self, split: str) -> dict[str, float]:
        """Metrics of the epoch so far; keys get a layer prefix when there are several."""
        stats = self.routing_stats[split]
        out: dict[str, float] = {}
        for i, tracker in enumerate(stats):
            prefix = f"layer{i}/" if len(stats) > 1 else ""
            out.update({f"{prefix}{k}": v for k, v in tracker.compute().items()})
        return out

    def _end_epoch(self, split: str) -> None:
        means = self._log_epoch_means(split)
        values = self.utilisation(split)
        if self.plan is not None:
            self.log(f"{split}/stage_index", float(self.stage_index), on_epoch=True)
        if values:
            self.log_dict({f"{split}/{k}": v for k, v in values.items()}, on_epoch=True)
        if not self.trainer.sanity_checking:
            self.history[split].append({**means, **values})
        if split == "test":
            self.test_tables = self.routing_stats[split]
            self.routing_stats[split] = []
        for tracker in self.routing_stats[split]:
            tracker.reset()

    def on_train_epoch_start(self) -> None:
        self._epoch_start = self._last_batch_end = time.perf_counter()
        self._epoch_samples = 0

    def on_train_epoch_end(self) -> None:
        seconds = max(self._last_batch_end - self._epoch_start, 1e-9)  # excludes validation
        self.train_samples_per_s = self._epoch_samples / seconds
        self.log("train/samples_per_s", self.train_samples_per_s, on_epoch=True)
        self._end_epoch("train")
        self._log_epoch_line()

    def _log_epoch_line(self) -> None:
        """One line per epoch in the run's log: loss, accuracy and balance (validation runs
        before this hook, so its values are this epoch's)."""
        parts = [
            f"{split}/{key}={self.history[split][-1][key]:.4f}"
            for split, keys in (("train", ("loss", "acc")), ("val", EPOCH_LINE_VAL_KEYS))
            if self.history[split]
            for key in keys
            if key in self.history[split][-1]
        ]
        log.info("epoch %d: %s", self.current_epoch, "  ".join(parts))

    def on_validation_epoch_end(self) -> None:
        self._end_epoch("val")

    def on_test_epoch_start(self) -> None:
        self.examples = {}

    def on_test_epoch_end(self) -> None:
        self._end_epoch("test")

    # -- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        if self.plan is not None:
            return self.plan.configure_optimizers(self)
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
