"""The LightningModule: cross-entropy plus the routers' weighted aux losses, accuracy, and
per-epoch utilisation and specialisation of every MoE layer, from the routing records.

Overfitting is watched per epoch: ``gap/acc`` = train/acc − val/acc and ``gap/loss`` =
val/ce − train/ce (positive when the model fits the training set better than held-out data;
the train values are the epoch's running means, with dropout on), each expert's accuracy on
the inputs routed to it (``{split}/acc_e{i}``) and the assignments it received
(``{split}/seen_e{i}``). The router can have its own learning rate and weight decay
(``optim.router_lr``, ``optim.router_weight_decay``): the router is small and decides where
every input goes, so it is the part worth tuning apart (Switch Transformers, Fedus et al.
2021, also treat it apart for stability: float32 router computation, smaller init scale).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_exp.errors import ConfigError, DivergedError
from moe_exp.moe import Routing, RoutingStats
from moe_exp.training.optim import adamw, make_schedule, router_parameters
from moe_exp.training.step_sums import StepSums

SPLITS = ("train", "val", "test")
EXAMPLES_PER_EXPERT = 8
EPOCH_LINE_VAL_KEYS = ("loss", "acc", "cv_load", "max_mean_load")
DIVERGENCE_CHECK_EVERY = 20  # training steps between the host reads of the divergence guard
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
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        scheduler: str = "onecycle",
        latents: Mapping[str, tuple[int, int]] | None = None,
        router_lr: float | None = None,
        router_weight_decay: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.latents = dict(latents or {})
        self.lr, self.weight_decay, self.scheduler = lr, weight_decay, scheduler
        self.router_lr, self.router_weight_decay = router_lr, router_weight_decay
        # "{split}_{i}" → StepSums, one per split and set of value names, made on first use
        self.step_sums = nn.ModuleDict()
        self._step_sums_keys: dict[tuple[str, tuple[str, ...]], str] = {}
        self.routing_stats: dict[str, list[RoutingStats]] = {s: [] for s in SPLITS}
        self.history: dict[str, list[dict[str, float]]] = {s: [] for s in (*SPLITS, "gap")}
        self._val_epoch = -1  # the epoch whose validation history["val"][-1] holds
        self.test_tables: list[RoutingStats] = []
        self._finite: Tensor | None = None  # every training loss since the last check finite
        self._unchecked = 0
        self.examples: dict[int, list[Tensor]] = {}
        self._epoch_start = self._last_batch_end = 0.0
        self._epoch_samples = 0
        self.train_samples_per_s = float("nan")
        # Optional training plan (see moe_exp.training.strategies): when set, it owns the
        # training step and the optimisers (manual optimisation); ``stage`` names the current
        # stage and is logged as ``stage_index`` (and tagged as ``stage`` on the CSV rows).
        self.plan: Any = None
        self.stage = ""
        self.stage_index = 0
        # Modules that must not change (expert surgery freezes them, moe_exp.training.surgery): kept
        # in eval mode through training, so dropout is off and BatchNorm statistics stay put.
        self.frozen_modules: list[nn.Module] = []
        self.old_experts: dict[int, dict[str, Tensor]] = {}  # their state as loaded, by id
        # what the checkpoints say they are (version, resolved config, input shape), set by
        # the app's build; read back by moe_exp.load
        self.description: dict[str, Any] = {}

    def forward(self, x: Tensor) -> tuple[Tensor, list[Routing]]:
        return self.model(x)

    # -- steps ----------------------------------------------------------------------------
    def step_batch(self, batch: tuple[Tensor, Tensor, Tensor], split: str) -> Tensor:
        """The joint loss of a batch (task + aux losses), its metrics and routing recorded."""
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
        self.track_routing(split, routings, y, latents)
        if split == "test" and routings:
            self._keep_examples(x, routings[0])
        return loss

    def check_finite(self, loss: Tensor) -> None:
        """The divergence guard: a NaN or infinite training loss stops the run. The test is
        kept on the device and read every ``DIVERGENCE_CHECK_EVERY`` steps and at the end of
        each epoch, since reading it waits for the device to finish the step."""
        finite = torch.isfinite(loss.detach())
        self._finite = finite if self._finite is None else self._finite & finite
        self._unchecked += 1
        if self._unchecked >= DIVERGENCE_CHECK_EVERY:
            self.raise_if_diverged(loss)

    def raise_if_diverged(self, loss: Tensor | None = None) -> None:
        unchecked, self._unchecked = self._unchecked, 0
        if self._finite is None or bool(self._finite):
            return
        stage = f" in stage {self.stage!r}" if self.stage else ""
        value = "nan or inf" if loss is None else f"{loss.item()}"
        raise DivergedError(
            f"Training diverged{stage}: the loss became {value} at epoch {self.current_epoch},"
            f" within the {unchecked} steps before step {self.global_step}. Lower the learning"
            " rate (optim.lr, or the stage's lr) or the regularizer weights and run again."
        )

    def record_step(
        self, split: str, log_probs: Tensor, y: Tensor, values: Mapping[str, Tensor]
    ) -> None:
        """Accumulate a step's accuracy and scalar values; they are logged once per epoch
        (a ``self.log`` per value and step would add Lightning's logging to every step)."""
        names = tuple(values)
        key = self._step_sums_keys.get((split, names))
        if key is None:  # a staged strategy's stages may log different values
            key = self._step_sums_keys[split, names] = f"{split}_{len(self._step_sums_keys)}"
            self.step_sums[key] = StepSums(names).to(self.device)
        self.step_sums[key].update(log_probs, y, list(values.values()))

    def _log_epoch_means(self, split: str) -> dict[str, float]:
        """Log (and return) the epoch's accuracy and mean step values, then reset them."""
        correct = inputs = 0.0
        totals: dict[str, float] = {}
        weights: dict[str, float] = {}
        for (metric_split, names), key in self._step_sums_keys.items():
            metric = self.step_sums[key]
            if metric_split != split or not metric.update_called:
                continue
            sums = metric.compute().tolist()  # the epoch's one transfer of these sums
            metric.reset()
            correct, inputs = correct + sums[0], inputs + sums[1]
            for name, total in zip(names, sums[2:], strict=True):
                totals[name] = totals.get(name, 0.0) + total
                weights[name] = weights.get(name, 0.0) + sums[1]
        values = {"acc": correct / inputs} if inputs else {}
        values.update({name: totals[name] / weights[name] for name in totals})
        for name, value in values.items():
            self.log(f"{split}/{name}", value, prog_bar=name in ("acc", "loss"))
        return values

    def training_step(self, batch, batch_idx: int) -> Tensor | None:
        if self.plan is not None:
            return self.plan.training_step(self, batch, batch_idx)
        return self.step_batch(batch, "train")

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """A flat tuple or list of tensors (every datamodule's batch) goes straight to the
        device, and is handed on as it is when already there; Lightning's generic walk
        through any nested collection is pure overhead for it. Anything else (a namedtuple,
        a dict) takes Lightning's way."""
        if type(batch) in (tuple, list) and all(isinstance(t, Tensor) for t in batch):
            if all(t.device == device for t in batch):
                return batch
            return type(batch)(t.to(device, non_blocking=True) for t in batch)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        for module in self.frozen_modules:  # Lightning puts the whole model in train mode
            if module.training:
                module.eval()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._epoch_samples += batch[1].shape[0]
        self._last_batch_end = time.perf_counter()

    def validation_step(self, batch, batch_idx: int) -> None:
        self.step_batch(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self.step_batch(batch, "test")

    # -- utilisation ----------------------------------------------------------------------
    def track_routing(
        self, split: str, routings: list[Routing], y: Tensor, latents: Tensor
    ) -> None:
        """Add a batch's routing records to the split's utilisation statistics."""
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
            sums = tracker.host()  # the epoch's one transfer of the routing sums
            out.update({f"{prefix}{k}": v for k, v in sums.compute().items()})
            # assignments each expert received this epoch (the samples it saw)
            out.update({f"{prefix}seen_e{e}": n for e, n in enumerate(sums.load.tolist())})
        return out

    def _end_epoch(self, split: str) -> None:
        means = self._log_epoch_means(split)  # torchmetrics syncs these across processes
        if self.trainer.world_size > 1:
            for tracker in self.routing_stats[split]:
                tracker.sync(self.device)
        values = self.utilisation(split)
        if self.plan is not None:
            self.log(f"{split}/stage_index", float(self.stage_index), on_epoch=True)
        if values:
            self.log_dict({f"{split}/{k}": v for k, v in values.items()}, on_epoch=True)
        # the per-epoch record holds training epochs; the final evaluation of the best
        # checkpoint goes to the summary (and its metrics rows say phase=validate/test)
        fitting = self.trainer.state.fn == "fit"
        if not self.trainer.sanity_checking and (fitting or split == "test"):
            entry = {**means, **values}
            if split == "val" and fitting:
                # epochs trained when it ran: validation may run mid-epoch or skip epochs
                # (trainer.val_check_interval, check_val_every_n_epoch), so its count is no clock
                done = self.trainer.fit_loop.epoch_loop.batch_progress.current.completed
                entry["epoch"] = self.current_epoch + done / max(
                    self.trainer.num_training_batches, 1
                )
                self._val_epoch = self.current_epoch
            self.history[split].append(entry)
        if split == "test":
            self.test_tables = [tracker.host() for tracker in self.routing_stats[split]]
            self.routing_stats[split] = []
        for tracker in self.routing_stats[split]:
            tracker.reset()

    def on_train_epoch_start(self) -> None:
        self._epoch_start = self._last_batch_end = time.perf_counter()
        self._epoch_samples = 0

    def on_train_epoch_end(self) -> None:
        self.raise_if_diverged()
        seconds = max(self._last_batch_end - self._epoch_start, 1e-9)  # excludes validation
        self.train_samples_per_s = self._epoch_samples / seconds
        self.log("train/samples_per_s", self.train_samples_per_s, on_epoch=True)
        self._end_epoch("train")
        self._log_gaps()
        self._log_epoch_line()

    def _log_gaps(self) -> None:
        """Train − validation gaps of this epoch (validation ran before this hook); skipped
        in epochs without validation."""
        if not self.history["train"] or self._val_epoch != self.current_epoch:
            return
        train, val = self.history["train"][-1], self.history["val"][-1]
        gaps = {}
        if "acc" in train and "acc" in val:
            gaps["acc"] = train["acc"] - val["acc"]
        if "ce" in train and "ce" in val:
            gaps["loss"] = val["ce"] - train["ce"]
        if gaps:
            self.log_dict({f"gap/{k}": v for k, v in gaps.items()}, on_epoch=True)
            self.history["gap"].append(gaps)

    def last_epoch(self) -> dict[str, float]:
        """The last training epoch's ``train/*`` values (balance as trained: with noise,
        dropout, and a bias still moving) and its ``gap/*``, for the run's summary."""
        last = {f"train/{k}": v for k, v in (self.history["train"] or [{}])[-1].items()}
        return last | {f"gap/{k}": v for k, v in (self.history["gap"] or [{}])[-1].items()}

    def _log_epoch_line(self) -> None:
        """One line per epoch in the run's log: loss, accuracy and balance (validation runs
        before this hook, so its values are this epoch's)."""
        validated = self._val_epoch == self.current_epoch  # else val/gap are an older epoch's
        parts = [
            f"{split}/{key}={self.history[split][-1][key]:.4f}"
            for split, keys in (
                ("train", ("loss", "acc")),
                ("val", EPOCH_LINE_VAL_KEYS if validated else ()),
                ("gap", ("acc",) if validated else ()),
            )
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

    # -- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The per-epoch history (a resumed run takes it back, see :func:`moe_exp.app.run.run`,
        so its plots cover the epochs before the resume too) and an index of the experts'
        state: expert i's tensors are the state_dict entries under its prefix, so one expert
        can be taken out and loaded into another mixture
        (:func:`moe_exp.training.surgery.expert_state`)."""
        checkpoint["history"] = self.history
        if self.description:  # the run's config and input shape: the checkpoint says what it is
            checkpoint["moe_exp"] = self.description
        experts = getattr(getattr(self.model, "moe", None), "experts", None)
        if isinstance(experts, nn.ModuleList):
            checkpoint["experts"] = [
                {"index": i, "kind": type(e).__name__, "prefix": f"model.moe.experts.{i}."}
                for i, e in enumerate(experts)
            ]

    # -- optimisation ---------------------------------------------------------------------
    def param_groups(
        self,
        params: list[nn.Parameter],
        lr: float,
        weight_decay: float | None = None,
        router_lr: float | None = None,
    ) -> list[dict[str, Any]]:
        """AdamW parameter groups of ``params`` (frozen ones left out): the routing side
        (:func:`router_parameters`) with ``router_lr`` (default ``lr``) and
        ``optim.router_weight_decay``, the rest with ``lr`` and ``weight_decay`` (default
        ``optim.weight_decay``). A ``weight_decay`` given by the caller (a stage's own)
        applies to both groups."""
        wd = self.weight_decay if weight_decay is None else weight_decay
        router_wd = wd
        if weight_decay is None and self.router_weight_decay is not None:
            router_wd = self.router_weight_decay
        routing = {id(p) for p in router_parameters(self.model)}
        params = [p for p in params if p.requires_grad]
        groups = [  # named for LearningRateMonitor: lr-AdamW/router, lr-AdamW/model
            {
                "name": "router",
                "params": [p for p in params if id(p) in routing],
                "lr": router_lr or lr,
                "weight_decay": router_wd,
            },
            {
                "name": "model",
                "params": [p for p in params if id(p) not in routing],
                "lr": lr,
                "weight_decay": wd,
            },
        ]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> Any:
        if self.plan is not None:
            return self.plan.configure_optimizers(self)
        groups = self.param_groups(list(self.parameters()), self.lr, router_lr=self.router_lr)
        if not groups:
            raise ConfigError("nothing to train: every parameter is frozen")
        optimizer = adamw(groups)
        schedule = make_schedule(self.scheduler, optimizer, self.trainer.estimated_stepping_batches)
        if schedule is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
