"""Training strategies (the ``strategy=`` axis): how gate and experts are optimised.

``joint``
    Gate and experts trained together end to end by backprop of the full loss, with
    Lightning's automatic optimisation (Jacobs et al. 1991; Shazeer et al. 2017).

``hierarchical``
    Staged training: a list of stages run in order inside ONE ``Trainer.fit`` (one
    metrics.csv, one step counter, one "best" checkpoint), each naming what trains
    (``experts``, ``gate`` or ``all``), its epochs and lr. The default recipe divides the
    data first and learns to route afterwards, as partition-based mixtures do (e.g.
    Collobert, Bengio & Bengio 2002, "A parallel mixture of SVMs for very large scale
    problems"): (1) each expert learns its own part of the training data, given by a
    partition (``kmeans`` on pixels or a fixed random projection, ``random``, or a discrete
    latent ``attribute``); the gate is not used, each input goes to its part's expert only;
    (2) the gate (gate encoder + router) learns, with the experts frozen, to send each input
    to the expert with the lowest loss on it (cross-entropy of the router logits against the
    argmin, or against softmax(−loss/τ) with ``gate_target=soft``); (3) joint fine-tuning.
    Router aux losses (balance regularizers) are used only in ``all`` stages: in a gate
    stage the targets are supervised and a balance term would fight them.

``em``
    Expectation–maximisation in the spirit of Jordan & Jacobs (1994), "Hierarchical
    mixtures of experts and the EM algorithm". Per batch, E-step (no grad, current model):
    posteriors h_i ∝ g_i(x) · p_i(y | x), normalised over experts, g = the router's dense
    softmax (``Routing.probs``). M-step: ``em_steps`` gradient steps on the same batch with
    h fixed, of Σ_i h_i · (−log p_i(y|x)) (experts) plus the cross-entropy −Σ_i h_i log g_i(x)
    (gate). The M-step is partial (a few gradient steps: generalised EM), as is usual for
    neural experts. (With ``em_steps=1`` the E-step reuses the M-step's forward pass,
    detached: the same numbers as a separate no-grad pass.) EM needs p_i(y|x) of EVERY
    expert, so it evaluates all E experts on every input: it is dense by nature, even with
    a top-k router (the top-k choice only matters at evaluation time, where the model runs
    as configured). ``schedule`` sets the alternation: ``batch`` (default) takes the E-step
    and one M-step of experts and gate together on every batch (incremental EM, Neal &
    Hinton 1998); ``epoch`` alternates whole epochs, experts-only M-steps then gate-only
    M-steps (experts, gate, experts, ...), the other side frozen as in the hierarchical
    stages: a block-coordinate version, the ECM idea of Meng & Rubin (1993), with the
    E-step still taken per batch from the current parameters (batches carry no dataset
    index to hold posteriors for a whole epoch).

Implementation (Lightning): staged and EM training use manual optimisation
(``automatic_optimization = False``) through :class:`~moe_exp.training.module.MoEClassifierModule`'s
``plan`` hook: the plan supplies the training step and ``configure_optimizers``. For
hierarchical training each stage has its own AdamW optimiser (and scheduler) holding only
that stage's parameters; frozen parameters also get ``requires_grad=False`` and frozen
modules run in eval mode, so nothing about them changes (no weight-decay drift, no
optimiser state). EM has one optimiser (``batch``) or one per side (``epoch``). Each
optimiser has two parameter groups, the routing side and the rest
(:meth:`~moe_exp.training.module.MoEClassifierModule.param_groups`): ``optim.router_weight_decay``
applies to the router in every stage without its own ``weight_decay``, and
``optim.router_lr`` in EM (a hierarchical stage's ``lr`` is explicit, so it rules there).
Parameters that expert surgery froze (``module.frozen_modules``, moe_exp/training/surgery.py) stay
frozen in every stage. The plan is also a Callback: it switches stages at epoch
boundaries, saves ``checkpoints/stage{i}_{name}.ckpt`` (i from 1) at the end of each
hierarchical stage, and tags every CSV metrics row with the stage's name (column
``stage``); every logger also gets the numeric ``{split}/stage_index``. The trainer's
``max_epochs`` is set to the sum of the stages' epochs. Its callback state (saved in every
checkpoint) names the current stage and the stage plan, so ``trainer.fit(...,
ckpt_path=...)`` on a checkpoint written during stage 2 resumes in stage 2, with that
stage's freezing and its optimiser state (Lightning restores every stage's optimiser and
scheduler); a checkpoint of another stage plan is refused.

Staged and EM training need a model with a separate gate and whole-classifier experts:
``model=mixture`` (``MixtureClassifier``: ``gate_encoder``, ``moe.router``, ``moe.experts``)
without shared experts. Other models fail with a :class:`~moe_exp.errors.ConfigError`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_exp.errors import ConfigError
from moe_exp.moe import Routing
from moe_exp.moe.layer import dispatch_combine, sort_by_expert
from moe_exp.training.module import make_schedule, router_parameters

log = logging.getLogger("moe_exp")

SUPPORTED_MODELS = ("mixture",)
STAGE_KINDS = ("experts", "gate", "all")
PARTITIONS = ("kmeans", "random", "attribute")
GATE_TARGETS = ("hard", "soft")


class JointStrategy:
    """Gate and experts trained together, end to end."""

    def fit(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        datamodule: L.LightningDataModule,
        ckpt_path: str | None = None,
    ) -> None:
        """Train; ``ckpt_path`` resumes from a checkpoint (every strategy takes it)."""
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)


# -- shared pieces ------------------------------------------------------------------------
def mixture_parts(module: Any, strategy: str) -> Any:
    """The module's MixtureClassifier, or a ConfigError naming the model and supported ones."""
    model = module.model
    ok = (
        hasattr(model, "gate_encoder")
        and hasattr(model, "moe")
        and isinstance(getattr(model.moe, "experts", None), nn.ModuleList)
    )
    if not ok:
        raise ConfigError(
            f"strategy={strategy} needs a model with a separate gate and whole-classifier "
            f"experts; model {type(model).__name__} does not support it. Supported: "
            f"model={', '.join(SUPPORTED_MODELS)} (MixtureClassifier), or use strategy=joint."
        )
    if len(getattr(model, "shared", ())):
        raise ConfigError(
            f"strategy={strategy} does not support model.shared_experts="
            f"{len(model.shared)} (always-on experts are outside the gate); set it to 0."
        )
    return model


def _layout(model: Any, x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if model.channels_last else x


def expert_logits(model: Any, x: Tensor) -> Tensor:
    """Every expert's raw outputs on every input, [N, E, C]."""
    x = _layout(model, x)
    return torch.stack([expert(x) for expert in model.moe.experts], dim=1)


def mixture_log_probs(model: Any, z: Tensor, gates: Tensor, x: Tensor) -> Tensor:
    """log p(y|x) of the mixture from expert outputs z [N, E, C] and dense gates [N, E]:
    mixed as the MoE layer mixes, finished by the model's own combiner."""
    outputs = model.moe.transform(z) if model.moe.transform is not None else z
    return model.combine_log_probs((gates.unsqueeze(-1) * outputs).sum(1), x)


def em_posteriors(gate_log_probs: Tensor, expert_log_lik: Tensor) -> Tensor:
    """E-step: h_i = g_i p_i(y|x) / Σ_j g_j p_j(y|x), from log g [N, E] and log p_i(y|x) [N, E]."""
    return torch.softmax(gate_log_probs + expert_log_lik, dim=-1)


def _record_chosen(routing: Routing, z: Tensor) -> None:
    """Per-expert predictions for the chosen (kept) assignments, as the MoE layer records."""
    rows, ids, _, _ = sort_by_expert(routing)
    routing.expert_predictions = (rows, ids, z[rows, ids].argmax(-1))


def _log_train(
    module: Any, loss: Tensor, log_probs: Tensor, batch: Sequence[Tensor], routing: Routing, **extra
) -> None:
    """The same train/* metrics as the joint step (loss, ce, acc, utilisation), plus extras."""
    _, y, latents = batch
    module.check_finite(loss)
    values = {"loss": loss, "ce": F.nll_loss(log_probs.detach(), y), **extra}
    module.record_step("train", log_probs, y, values)
    module._track("train", [routing], y, latents)


def _tag_loggers(trainer: L.Trainer, plan: Any) -> None:
    """Add the current stage's name to every row the CSV loggers write."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger) and not getattr(logger, "_stage_tagged", False):
            original = logger.log_metrics

            def tagged(metrics: Mapping[str, Any], step: int | None = None, _f=original) -> None:
                _f({**metrics, "stage": plan.current_name}, step)

            logger.log_metrics = tagged
            logger._stage_tagged = True


def _quiet() -> None:
    warnings.filterwarnings("ignore", message=r".*returned `None`, this fit will run.*")


# -- partitions -----------------------------------------------------------------------------
def _hash_unit(x: Tensor, seed: int) -> Tensor:
    """A deterministic pseudo-random number in [0, 1) per image, from its pixels (the batches
    carry no dataset index, so a fixed 'random' partition is a hash of the content)."""
    g = torch.Generator().manual_seed(seed + 7919)
    w = torch.randn(x[0].numel(), generator=g).to(x.device, torch.float64)
    v = x.reshape(x.shape[0], -1).to(torch.float64) @ w * 1000.0
    return torch.frac(v.abs())


class Partition:
    """Which part (= expert) each training input belongs to; there are exactly E parts.

    ``kmeans``: Lloyd's k-means (k-means++ seeding, ``iters`` iterations) on the training
    images' pixels, or on a fixed random projection to ``projection`` dims when > 0; an input
    goes to its nearest centroid. ``random``: a fixed pseudo-random, content-independent
    hash of the image (with ``data.augment`` on, an augmented copy may land in another
    part). ``attribute``: the discrete latent ``attribute`` (batch[2] column);
    with V values and E experts, V must be <= E: value v goes to experts v, v+V, v+2V, …
    (round-robin), and when V < E an input of value v is split among its experts by the hash.
    """

    def __init__(
        self,
        kind: str,
        num_experts: int,
        seed: int = 0,
        attribute: str | None = None,
        projection: int = 0,
        iters: int = 10,
    ) -> None:
        if kind not in PARTITIONS:
            raise ConfigError(f"strategy.partition={kind!r} is not one of {', '.join(PARTITIONS)}")
        self.kind, self.num_experts, self.seed = kind, num_experts, seed
        self.attribute, self.projection, self.iters = attribute, projection, iters
        self.centroids: Tensor | None = None
        self.proj: Tensor | None = None
        self.column = self.values = 0

    def fit(self, datamodule: Any, latents: Mapping[str, tuple[int, int]]) -> Partition:
        e = self.num_experts
        if self.kind == "attribute":
            if self.attribute not in latents:
                raise ConfigError(
                    f"strategy.attribute={self.attribute!r} is not a discrete latent of this "
                    f"data; available: {', '.join(latents) or 'none'}"
                )
            self.column, self.values = latents[self.attribute]
            if self.values > e:
                raise ConfigError(
                    f"strategy.partition=attribute: {self.attribute} has {self.values} values "
                    f"but experts={e}; the partition needs one part per expert (values <= "
                    f"experts; fewer values are spread round-robin). Set experts={self.values}."
                )
        elif self.kind == "kmeans":
            images = datamodule.splits["train"].images
            self.centroids = self._kmeans(self._features(images.float(), fit=True))
        return self

    def _features(self, x: Tensor, fit: bool = False) -> Tensor:
        flat = x.reshape(x.shape[0], -1).float()
        if self.projection <= 0:
            return flat
        if fit or self.proj is None:
            g = torch.Generator().manual_seed(self.seed + 104729)
            self.proj = torch.randn(flat.shape[1], self.projection, generator=g)
            self.proj /= flat.shape[1] ** 0.5
        return flat @ self.proj.to(flat.device)

    def _kmeans(self, feats: Tensor) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        n, e = feats.shape[0], self.num_experts
        if n < e:
            raise ConfigError(f"k-means partition: {n} training inputs < experts={e}")
        centroids = feats[torch.randint(n, (1,), generator=g)]
        for _ in range(1, e):  # k-means++ seeding
            d = torch.cdist(feats, centroids).min(1).values.pow(2)
            weights = d if float(d.sum()) > 0 else torch.ones_like(d)
            pick = torch.multinomial(weights, 1, generator=g)
            centroids = torch.cat([centroids, feats[pick]])
        for _ in range(self.iters):
            assign = torch.cdist(feats, centroids).argmin(1)
            for j in range(e):
                members = feats[assign == j]
                if len(members):
                    centroids[j] = members.mean(0)
        return centroids

    def __call__(self, x: Tensor, latents: Tensor) -> Tensor:
        """The part (expert id) of each input, long [N]."""
        e = self.num_experts
        if self.kind == "random":
            return (_hash_unit(x, self.seed) * e).long().clamp_max(e - 1)
        if self.kind == "kmeans":
            c = self.centroids.to(x.device)
            return torch.cdist(self._features(x), c).argmin(1)
        v = latents[:, self.column].long()
        if self.values == e:
            return v
        share = (e - v + self.values - 1) // self.values  # experts v, v+V, ... below e
        pick = (_hash_unit(x, self.seed) * share).long().clamp_max(share - 1)
        return v + self.values * pick


# -- hierarchical ------------------------------------------------------------------------
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


class _Plan(L.Callback):
    """Shared machinery of the manual-optimisation strategies (stages, tagging, checkpoints)."""

    strategy = ""
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

    def attach(self, trainer: L.Trainer, module: Any, datamodule: Any) -> None:
        _quiet()
        self.model = mixture_parts(module, self.strategy)
        module.plan = self
        module.automatic_optimization = False
        trainer.fit_loop.max_epochs = sum(s.epochs for s in self.stages)
        trainer.callbacks.append(self)
        _tag_loggers(trainer, self)

    def fit(
        self,
        trainer: L.Trainer,
        module: Any,
        datamodule: Any,
        ckpt_path: str | None = None,
    ) -> None:
        """Attach the plan and train; ``ckpt_path`` resumes a run in the stage it was in."""
        self.attach(trainer, module, datamodule)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

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
            opt = torch.optim.AdamW(
                module.param_groups(params, first.lr, first.weight_decay, router_lr)
            )
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
    def on_train_epoch_start(self, trainer: L.Trainer, module: Any) -> None:
        index = self.stage_at(trainer.current_epoch)
        if index != self.current:
            self.enter(module, index)

    def on_train_batch_start(
        self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.current < 0:  # resumed mid-epoch: no epoch start ran since the restore
            self.enter(module, self.stage_at(trainer.current_epoch))

    def on_train_epoch_end(self, trainer: L.Trainer, module: Any) -> None:
        ends = sum(s.epochs for s in self.stages[: self.current + 1])
        if self.stage_checkpoints and trainer.current_epoch + 1 == ends:
            name = f"stage{self.current + 1}_{self.stages[self.current].name}.ckpt"
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "checkpoints" / name)

    def on_fit_end(self, trainer: L.Trainer, module: Any) -> None:
        frozen = frozen_ids(module)
        for p in self.model.parameters():
            p.requires_grad_(id(p) not in frozen)


class HierarchicalStrategy(_Plan):
    """Staged training: experts on their partition → gate towards the best expert → all."""

    strategy = "hierarchical"

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

    def attach(self, trainer: L.Trainer, module: Any, datamodule: Any) -> None:
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
            loss = module._step(batch, "train")
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
        x = _layout(model, x)
        mixed = dispatch_combine(x, routing, model.moe.experts, model.moe.transform, True)
        log_probs = model.combine_log_probs(mixed, x)
        loss = F.nll_loss(log_probs, y)
        _log_train(module, loss, log_probs, batch, routing)
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
            z = expert_logits(model, x)  # [N, E, C]
            nll = -F.log_softmax(z, -1).gather(-1, y[:, None, None].expand(-1, z.shape[1], 1))
            target = self.gate_targets(nll.squeeze(-1))
        routing = model.moe.router(model.gate_encoder(x))
        loss = -(target * routing.log_probs()).sum(-1).mean()
        with torch.no_grad():
            log_probs = mixture_log_probs(model, z, routing.gates(), x)
        _record_chosen(routing, z)
        _log_train(module, loss, log_probs, batch, routing, gate_ce=loss)
        return loss


# -- EM ------------------------------------------------------------------------------------
class EMStrategy(_Plan):
    """EM (Jordan & Jacobs 1994): posteriors h ∝ g·p(y|x) (E-step), then posterior-weighted
    NLL for the experts and cross-entropy to h for the gate (M-step), ``em_steps`` per batch.

    ``schedule="batch"``: both M-steps on every batch (one optimiser, stage ``em``);
    ``schedule="epoch"``: epochs alternate experts-only (stage ``em_experts``) and gate-only
    (``em_gate``) M-steps, starting with the experts, each side with its own optimiser and
    the other side frozen."""

    strategy = "em"
    use_router_lr = True
    stage_checkpoints = False

    def __init__(
        self,
        em_steps: int = 1,
        epochs: int | None = None,
        lr: float | None = None,
        schedule: str = "batch",
    ) -> None:
        self.steps_per_batch = em_steps
        self._epochs, self._lr, self.schedule = epochs, lr, schedule
        super().__init__([])

    def attach(self, trainer: L.Trainer, module: Any, datamodule: Any) -> None:
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
        routing = model.moe.router(model.gate_encoder(x))
        log_g = routing.log_probs()  # all experts
        z = expert_logits(model, x)
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
            log_probs = mixture_log_probs(self.model, z, log_g.exp(), batch[0])
        _record_chosen(routing, z.detach())
        _log_train(
            module,
            loss,
            log_probs,
            batch,
            routing,
            em_expert_nll=expert_loss,
            em_gate_ce=gate_loss,
        )
        return loss.detach()
