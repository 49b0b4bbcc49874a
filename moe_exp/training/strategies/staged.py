"""The machinery of staged training, shared by the hierarchical and EM strategies.

A :class:`StagedStrategy` is a set of Lightning hooks and the LightningModule's ``plan``: under
manual optimisation it supplies the training step and the optimisers (one AdamW per stage,
or per side for EM, each with the routing and the other parameter groups), switches stages
at epoch boundaries inside one ``Trainer.fit``, freezes what a stage does not train
(``requires_grad`` off, eval mode, and what expert surgery froze), saves
``checkpoints/stage{i}_{name}.ckpt`` and tags every metrics row with the stage. Its
checkpoint state names the stage, so a resumed run continues in it. It needs a model that
declares ``separate_gate`` (the mixture) without shared experts.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from moe_exp.errors import ConfigError
from moe_exp.moe import Routing
from moe_exp.moe.layer import sort_by_expert
from moe_exp.moe.rules import Composition
from moe_exp.training.optim import adamw, make_schedule, router_parameters

log = logging.getLogger("moe_exp")
STAGE_KINDS = ("experts", "gate", "all")


def model_problems(
    strategy: str, model_class: Any, shared_experts: int, model: str, separate: list[str]
) -> list[str]:
    """A staged strategy trains gate and experts apart: the model must declare
    ``separate_gate`` (``separate``: the model options that do) and have no always-on
    experts outside the gate."""
    if not getattr(model_class, "separate_gate", False):
        needs = f"model={' or '.join(separate)}" if separate else "a model"
        return [
            f"strategy={strategy} needs {needs} (a separate gate and whole-classifier "
            f"experts), not {model}; or use strategy=joint"
        ]
    if shared_experts:
        return [
            f"model.shared_experts={shared_experts} is not supported by strategy={strategy} "
            "(always-on experts are outside the gate); set it to 0"
        ]
    return []


def record_chosen(routing: Routing, z: Tensor) -> None:
    """Per-expert predictions for the chosen (kept) assignments, as the MoE layer records."""
    rows, ids, _, _ = sort_by_expert(routing)
    routing.expert_predictions = (rows, ids, z[rows, ids].argmax(-1))


def log_train_step(
    module: Any, loss: Tensor, log_probs: Tensor, batch: Sequence[Tensor], routing: Routing, **extra
) -> None:
    """The same train/* metrics as the joint step (loss, ce, acc, utilisation), plus extras."""
    _, y, latents = batch
    module.check_finite(loss)
    values = {"loss": loss, "ce": F.nll_loss(log_probs.detach(), y), **extra}
    module.record_step("train", log_probs, y, values)
    module.track_routing("train", [routing], y, latents)


@dataclass
class Stage:
    train: str
    epochs: int
    lr: float
    name: str = ""
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        if self.train not in STAGE_KINDS:
            raise ConfigError(
                f"strategy.stages: train={self.train!r} is not one of {', '.join(STAGE_KINDS)}"
            )
        if self.epochs < 1:
            raise ConfigError(f"strategy.stages: epochs={self.epochs} must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"strategy.stages: lr={self.lr} must be > 0")
        self.name = self.name or self.train


def stage_parameters(model: Any, kind: str) -> list[nn.Parameter]:
    """The parameters a stage of this kind trains."""
    if kind == "experts":
        return list(model.moe.experts.parameters())
    if kind == "gate":
        return router_parameters(model)
    return list(model.parameters())


def frozen_ids(module: Any) -> set[int]:
    """Parameters expert surgery froze for the whole run (``module.frozen_modules``)."""
    return {id(p) for m in getattr(module, "frozen_modules", ()) for p in m.parameters()}


class StagedStrategy:
    """Shared machinery of the manual-optimisation strategies (stages, tagging, checkpoints).
    Its ``on_*`` hooks and checkpoint state reach Lightning through
    :class:`~moe_exp.training.adapters.StrategyHooks`."""

    strategy = ""

    @classmethod
    def config_problems(cls, args: Mapping[str, Any], run: Composition) -> list[str]:
        model = run.targets.get("model")
        shared = run.args.get("model", {}).get("shared_experts") or 0
        separate = run.options("model", lambda c: getattr(c, "separate_gate", False))
        name = run.choices.get("strategy", cls.strategy)
        problems = model_problems(name, model, shared, run.name("model"), separate)
        automatic = [  # Lightning applies these only where it steps the optimiser itself
            f"trainer.{key}={run.trainer[key]}"
            for key, default in (("gradient_clip_val", None), ("accumulate_grad_batches", 1))
            if run.trainer.get(key, default) not in (default, 0)
        ]
        if automatic:
            problems.append(
                f"{', '.join(automatic)} cannot apply to strategy={name}: it steps its "
                "optimisers itself (Lightning's manual optimisation); leave them at their "
                "defaults, or use strategy=joint"
            )
        return problems

    steps_per_batch = 1  # optimiser steps per training batch (EM: em_steps)
    use_router_lr = False  # optim.router_lr for the routing group (else the stage's lr)
    stage_checkpoints = True  # checkpoints/stage{i}_{name}.ckpt at the end of each stage

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self.current = -1
        self.model: Any = None
        self.restored: int | None = None  # the stage a checkpoint was saved in

    @property
    def current_name(self) -> str:
        return self.stages[max(self.current, 0)].name

    def stage_at(self, epoch: int) -> int:
        end = 0
        for i, stage in enumerate(self.stages):
            end += stage.epochs
            if epoch < end:
                return i
        return len(self.stages) - 1

    def optimizer_slots(self) -> list[int]:
        """Which optimiser each stage steps (one per stage unless a strategy shares them)."""
        return list(range(len(self.stages)))

    def attach(self, trainer: Any, module: Any, datamodule: Any) -> None:
        """Become the module's plan (its training step and optimisers) and a callback of the
        trainer; a model built from the library directly is checked here."""
        # manual optimisation returns no loss to Lightning on purpose
        warnings.filterwarnings("ignore", message=r".*returned `None`, this fit will run.*")
        model = module.model
        shared = len(getattr(model, "shared", ()))
        problems = model_problems(self.strategy, type(model), shared, type(model).__name__, [])
        if problems:
            raise ConfigError(problems[0] + ".")
        self.model = model
        module.plan = self
        module.automatic_optimization = False
        trainer.fit_loop.max_epochs = sum(s.epochs for s in self.stages)
        from moe_exp.training.adapters import StrategyHooks
        from moe_exp.training.csv_logger import tag_rows

        trainer.callbacks.append(StrategyHooks(self))
        tag_rows(trainer.loggers, "stage", lambda: self.current_name)  # on every metrics row

    def fit(
        self,
        trainer: Any,
        module: Any,
        datamodule: Any,
        ckpt_path: str | None = None,
    ) -> None:
        """Attach the plan and train; ``ckpt_path`` resumes a run in the stage it was in."""
        from moe_exp.training.adapters import lightning_data

        self.attach(trainer, module, datamodule)
        trainer.fit(module, datamodule=lightning_data(datamodule), ckpt_path=ckpt_path)

    def trainable(self, module: Any, kind: str) -> list[nn.Parameter]:
        """What a stage of this kind trains, less what expert surgery froze."""
        frozen = frozen_ids(module)
        return [p for p in stage_parameters(self.model, kind) if id(p) not in frozen]

    def configure_optimizers(self, module: Any) -> Any:
        """One AdamW optimiser per slot (:meth:`optimizer_slots`), holding only the
        parameters its stages train, scheduled over those stages' steps."""
        per_epoch = module.trainer.estimated_stepping_batches / module.trainer.max_epochs
        slots = self.optimizer_slots()
        router_lr = module.router_lr if self.use_router_lr else None
        optimizers, schedulers = [], []
        for slot in range(max(slots) + 1):
            members = [s for s, j in zip(self.stages, slots, strict=True) if j == slot]
            first = members[0]
            params = self.trainable(module, first.train)
            if not params:
                raise ConfigError(
                    f"stage {first.name!r} trains {first.train}, but all of it is frozen "
                    "(surgery.train); train it there or drop the stage"
                )
            opt = adamw(module.param_groups(params, first.lr, first.weight_decay, router_lr))
            optimizers.append(opt)
            steps = round(per_epoch * sum(s.epochs for s in members)) * self.steps_per_batch
            sched = make_schedule(module.scheduler, opt, steps)
            if sched is not None:
                schedulers.append({"scheduler": sched, "interval": "step"})
        self.has_schedulers = bool(schedulers)
        return optimizers, schedulers

    def enter(self, module: Any, index: int) -> None:
        """Freeze everything the stage does not train (requires_grad off, eval mode)."""
        self.current = index
        stage = self.stages[index]
        module.stage, module.stage_index = stage.name, index
        trainable = {id(p) for p in self.trainable(module, stage.train)}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trainable)
        resumed = " (resumed)" if self.restored is not None else ""
        self.restored = None
        log.info(
            "stage %d/%d %r%s: training %s for %d epoch(s), lr %g",
            index + 1,
            len(self.stages),
            stage.name,
            resumed,
            stage.train,
            stage.epochs,
            stage.lr,
        )

    def set_modes(self, module: Any) -> None:
        """Train mode for what trains, eval mode for what is frozen (this stage's and what
        surgery froze). The whole model goes back to train mode first: after validation
        Lightning restores each submodule's earlier mode, which would leave a part frozen in
        the previous stage in eval mode (the noisy gate without its noise)."""
        self.model.train()
        kind = self.stages[self.current].train
        if kind == "gate":
            self.model.moe.experts.eval()
        elif kind == "experts":
            self.model.gate_encoder.eval()
            self.model.moe.router.eval()
        for frozen in getattr(module, "frozen_modules", ()):
            frozen.eval()

    def step(self, module: Any, loss: Tensor) -> None:
        slot = self.optimizer_slots()[self.current]
        optimizers = module.optimizers()
        opt = optimizers[slot] if isinstance(optimizers, list) else optimizers
        opt.zero_grad()
        module.manual_backward(loss)
        opt.step()
        if getattr(self, "has_schedulers", False):
            schedulers = module.lr_schedulers()
            sched = schedulers[slot] if isinstance(schedulers, list) else schedulers
            sched.step()

    # checkpoint state: the stage the run was in, and the stage plan it was in it under
    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.current, "stages": [s.name for s in self.stages]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        names = [s.name for s in self.stages]
        if list(state_dict.get("stages", [])) != names:
            raise ConfigError(
                f"cannot resume: the checkpoint was saved under the stages "
                f"{state_dict.get('stages')}, this run has {names}; resume with the same "
                "strategy (strategy.stages, and trainer.max_epochs for em)"
            )
        self.restored = int(state_dict["stage"])
        self.current = -1  # enter the stage again at the next epoch: freezing, logging

    # callback hooks
    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        index = self.stage_at(trainer.current_epoch)
        if index != self.current:
            self.enter(module, index)

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if self.current < 0:  # resumed mid-epoch: no epoch start ran since the restore
            self.enter(module, self.stage_at(trainer.current_epoch))

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        ends = sum(s.epochs for s in self.stages[: self.current + 1])
        if self.stage_checkpoints and trainer.current_epoch + 1 == ends:
            name = f"stage{self.current + 1}_{self.stages[self.current].name}.ckpt"
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "checkpoints" / name)

    def on_fit_end(self, trainer: Any, module: Any) -> None:
        frozen = frozen_ids(module)
        for p in self.model.parameters():
            p.requires_grad_(id(p) not in frozen)
