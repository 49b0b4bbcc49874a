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
    as configured).

Implementation (Lightning): staged and EM training use manual optimisation
(``automatic_optimization = False``) through :class:`~moe_exp.lit.MoEClassifierModule`'s
``plan`` hook: the plan supplies the training step and ``configure_optimizers``. For
hierarchical training each stage has its own AdamW optimiser (and scheduler) holding only
that stage's parameters; frozen parameters also get ``requires_grad=False`` and frozen
modules run in eval mode, so nothing about them changes (no weight-decay drift, no
optimiser state). The plan is also a Callback: it switches stages at epoch boundaries,
saves ``checkpoints/stage{i}_{name}.ckpt`` (i from 1) at the end of each stage, and tags
every CSV metrics row with the stage's name (column ``stage``); every logger also gets the
numeric ``{split}/stage_index``. The trainer's ``max_epochs`` is set to the sum of the
stages' epochs.

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
from moe_exp.moe.layer import dispatch_combine

log = logging.getLogger("moe_exp")

SUPPORTED_MODELS = ("mixture",)
STAGE_KINDS = ("experts", "gate", "all")
PARTITIONS = ("kmeans", "random", "attribute")
GATE_TARGETS = ("hard", "soft")


class JointStrategy:
    """Gate and experts trained together, end to end."""

    name = "joint"

    def fit(
        self, trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule
    ) -> None:
        trainer.fit(module, datamodule=datamodule)


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
    n, k = routing.indices.shape
    rows = torch.arange(n, device=z.device).repeat_interleave(k)
    ids = routing.indices.reshape(-1)
    keep = ids >= 0
    rows, ids = rows[keep], ids[keep]
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


def _schedule(module: Any, optimizer: torch.optim.Optimizer, lr: float, steps: int) -> Any:
    if module.scheduler == "none":
        return None
    if module.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1))
    if module.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    raise ValueError(f"unknown scheduler {module.scheduler!r}")


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
        return [*model.gate_encoder.parameters(), *model.moe.router.parameters()]
    return list(model.parameters())


class _Plan(L.Callback):
    """Shared machinery of the manual-optimisation strategies (stages, tagging, checkpoints)."""

    strategy = ""
    steps_per_batch = 1  # optimiser steps per training batch (EM: em_steps)

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self.current = -1
        self.model: Any = None

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

    def attach(self, trainer: L.Trainer, module: Any, datamodule: Any) -> None:
        _quiet()
        self.model = mixture_parts(module, self.strategy)
        module.plan = self
        module.automatic_optimization = False
        trainer.fit_loop.max_epochs = sum(s.epochs for s in self.stages)
        trainer.callbacks.append(self)
        _tag_loggers(trainer, self)

    def fit(self, trainer: L.Trainer, module: Any, datamodule: Any) -> None:
        self.attach(trainer, module, datamodule)
        trainer.fit(module, datamodule=datamodule)

    # optimisers: one per stage, each holding that stage's parameters only
    def configure_optimizers(self, module: Any) -> Any:
        per_epoch = module.trainer.estimated_stepping_batches / module.trainer.max_epochs
        optimizers, schedulers = [], []
        for stage in self.stages:
            params = stage_parameters(self.model, stage.train)
            wd = module.weight_decay if stage.weight_decay is None else stage.weight_decay
            opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=wd)
            optimizers.append(opt)
            steps = round(per_epoch * stage.epochs) * self.steps_per_batch
            sched = _schedule(module, opt, stage.lr, steps)
            if sched is not None:
                schedulers.append({"scheduler": sched, "interval": "step"})
        self.has_schedulers = bool(schedulers)
        return optimizers, schedulers

    def enter(self, module: Any, index: int) -> None:
        """Freeze everything the stage does not train (requires_grad off, eval mode)."""
        self.current = index
        stage = self.stages[index]
        module.stage, module.stage_index = stage.name, index
        trainable = {id(p) for p in stage_parameters(self.model, stage.train)}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trainable)
        log.info(
            "stage %d/%d %r: training %s for %d epoch(s), lr %g",
            index + 1,
            len(self.stages),
            stage.name,
            stage.train,
            stage.epochs,
            stage.lr,
        )

    def set_modes(self) -> None:
        """Lightning sets train mode each epoch; frozen parts go back to eval mode."""
        kind = self.stages[self.current].train
        if kind == "gate":
            self.model.moe.experts.eval()
        elif kind == "experts":
            self.model.gate_encoder.eval()
            self.model.moe.router.eval()

    def step(self, module: Any, loss: Tensor) -> None:
        optimizers = module.optimizers()
        opt = optimizers[self.current] if isinstance(optimizers, list) else optimizers
        opt.zero_grad()
        module.manual_backward(loss)
        opt.step()
        if getattr(self, "has_schedulers", False):
            schedulers = module.lr_schedulers()
            sched = schedulers[self.current] if isinstance(schedulers, list) else schedulers
            sched.step()

    # callback hooks
    def on_train_epoch_start(self, trainer: L.Trainer, module: Any) -> None:
        index = self.stage_at(trainer.current_epoch)
        if index != self.current:
            self.enter(module, index)

    def on_train_epoch_end(self, trainer: L.Trainer, module: Any) -> None:
        ends = sum(s.epochs for s in self.stages[: self.current + 1])
        if trainer.current_epoch + 1 == ends:
            name = f"stage{self.current + 1}_{self.stages[self.current].name}.ckpt"
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "checkpoints" / name)

    def on_fit_end(self, trainer: L.Trainer, module: Any) -> None:
        for p in self.model.parameters():
            p.requires_grad_(True)


class HierarchicalStrategy(_Plan):
    """Staged training: experts on their partition → gate towards the best expert → all."""

    strategy = name = "hierarchical"

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
        self.set_modes()
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
        loss = -(target * F.log_softmax(routing.logits, -1)).sum(-1).mean()
        with torch.no_grad():
            log_probs = mixture_log_probs(model, z, routing.gates(), x)
        _record_chosen(routing, z)
        _log_train(module, loss, log_probs, batch, routing, gate_ce=loss)
        return loss


# -- EM ------------------------------------------------------------------------------------
class EMStrategy(_Plan):
    """EM (Jordan & Jacobs 1994): posteriors h ∝ g·p(y|x) (E-step), then posterior-weighted
    NLL for the experts and cross-entropy to h for the gate (M-step), ``em_steps`` per batch."""

    strategy = name = "em"

    def __init__(self, em_steps: int = 1, epochs: int | None = None, lr: float | None = None):
        if em_steps < 1:
            raise ConfigError(f"strategy.em_steps={em_steps} must be >= 1")
        self.em_steps = self.steps_per_batch = em_steps
        self._epochs, self._lr = epochs, lr
        super().__init__([])

    def attach(self, trainer: L.Trainer, module: Any, datamodule: Any) -> None:
        epochs = self._epochs or trainer.max_epochs
        self.stages = [Stage("all", epochs, self._lr or module.lr, name="em")]
        super().attach(trainer, module, datamodule)

    def losses(self, batch: Sequence[Tensor], h: Tensor | None = None) -> tuple:
        x, y, _ = batch
        model = self.model
        routing = model.moe.router(model.gate_encoder(x))
        log_g = F.log_softmax(routing.logits, -1)  # = log Routing.probs, all experts
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
        h = None
        for _ in range(self.em_steps):
            routing, z, log_g, h, expert_loss, gate_loss = self.losses(batch, h)
            loss = expert_loss + gate_loss
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
