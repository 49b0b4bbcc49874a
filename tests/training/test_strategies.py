"""The strategy axis: staged (hierarchical) training with real freezing, and EM."""

import csv

import lightning as L
import pytest
import torch

from moe_exp.app.build import build_components
from moe_exp.app.config import instantiate, validate
from moe_exp.errors import ConfigError
from moe_exp.training.strategies import (
    EMStrategy,
    Partition,
    em_posteriors,
    stage_parameters,
)
from tests.conftest import TINY, compose_config, seeded_build, single_run_dir

SMALL = [*TINY, "expert=mlp"]
TWO_STAGES = (
    "strategy.stages=[{train: experts, epochs: 1, lr: 0.01},"
    " {train: gate, epochs: 1, lr: 0.01, name: route}]"
)


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class StageWatch(L.Callback):
    """Per epoch: were the experts / the gate untouched, and what did the optimiser hold?"""

    def __init__(self):
        self.epochs = []

    def on_train_epoch_start(self, trainer, module):
        model = module.model
        self.experts = _snapshot(stage_parameters(model, "experts"))
        self.gate = _snapshot(stage_parameters(model, "gate"))

    def on_train_epoch_end(self, trainer, module):
        model = module.model
        plan = module.plan
        optimizer = trainer.optimizers[plan.optimizer_slots()[plan.current]]
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.epochs.append(
            {
                "stage": module.stage,
                "experts_same": _same(self.experts, stage_parameters(model, "experts")),
                "gate_same": _same(self.gate, stage_parameters(model, "gate")),
                "holds_experts": any(id(p) in held for p in stage_parameters(model, "experts")),
                "holds_gate": any(id(p) in held for p in stage_parameters(model, "gate")),
                "expert_grads": any(p.requires_grad for p in stage_parameters(model, "experts")),
            }
        )


def watched_fit(cfg, run_dir):
    """Train with the strategy, a StageWatch first among the callbacks (seeded)."""
    datamodule, module, trainer = seeded_build(cfg, run_dir)
    watch = StageWatch()
    trainer.callbacks.insert(0, watch)
    strategy = instantiate(cfg.strategy)
    strategy.fit(trainer, module, datamodule)
    return trainer, module, watch


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("staged")
    cfg = compose_config([*SMALL, "strategy=hierarchical", TWO_STAGES])
    trainer, _, watch = watched_fit(cfg, run_dir)
    return run_dir, watch.epochs, trainer


def test_experts_stage_leaves_the_gate_bit_identical(staged_run):
    _, epochs, _ = staged_run
    first = epochs[0]
    assert first["stage"] == "experts"
    assert first["gate_same"] and not first["experts_same"]
    assert first["holds_experts"] and not first["holds_gate"]


def test_gate_stage_leaves_every_expert_bit_identical(staged_run):
    _, epochs, _ = staged_run
    second = epochs[1]
    assert second["stage"] == "route"
    assert second["experts_same"] and not second["gate_same"]
    assert not second["holds_experts"] and second["holds_gate"]
    assert not second["expert_grads"]


def test_each_stage_is_logged_and_checkpointed(staged_run):
    run_dir, _, trainer = staged_run
    assert trainer.max_epochs == 2
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert rows and all(r["stage"] in ("experts", "route") for r in rows)
    assert {r["stage"] for r in rows} == {"experts", "route"}
    assert any(r["stage"] == "route" and r.get("train/acc") for r in rows)
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "stage1_experts.ckpt").is_file()
    assert (checkpoints / "stage2_route.ckpt").is_file()


def test_em_posteriors_match_a_hand_computation():
    g = torch.tensor([[0.25, 0.75]])
    p = torch.tensor([[0.8, 0.2]])  # p_i(y | x) of the true label
    h = em_posteriors(g.log(), p.log())
    # h ∝ g·p = [0.2, 0.15]
    torch.testing.assert_close(h, torch.tensor([[0.2 / 0.35, 0.15 / 0.35]]))
    torch.manual_seed(0)
    h = em_posteriors(torch.randn(16, 5).log_softmax(-1), -torch.rand(16, 5) * 5)
    torch.testing.assert_close(h.sum(-1), torch.ones(16))


def _shapes(experts):
    cfg = compose_config([*SMALL, f"experts={experts}", "k=1"])
    return build_components(cfg)


def test_attribute_partition_puts_each_colour_on_its_own_expert():
    datamodule, module = _shapes(4)
    part = Partition("attribute", 4, attribute="colour").fit(datamodule, module.latents)
    x, _, latents = next(iter(datamodule.train_dataloader()))
    colour = latents[:, datamodule.latent_names.index("colour")].long()
    experts = part(x, latents)
    for c in colour.unique():
        assert experts[colour == c].unique().tolist() == [int(c)]


def test_attribute_partition_spreads_fewer_values_round_robin_and_rejects_more():
    datamodule, module = _shapes(8)
    part = Partition("attribute", 8, attribute="colour").fit(datamodule, module.latents)
    x, _, latents = next(iter(datamodule.train_dataloader()))
    colour = latents[:, datamodule.latent_names.index("colour")].long()
    experts = part(x, latents)
    assert torch.equal(experts % 4, colour) and experts.max() < 8
    with pytest.raises(ConfigError, match="colour has 4 values but experts=2"):
        Partition("attribute", 2, attribute="colour").fit(datamodule, module.latents)
    with pytest.raises(ConfigError, match="not a discrete latent"):
        Partition("attribute", 4, attribute="hue").fit(datamodule, module.latents)


@pytest.mark.parametrize("kind", ["kmeans", "random"])
def test_kmeans_and_random_partitions_give_every_input_one_of_e_parts(kind):
    datamodule, module = _shapes(4)
    part = Partition(kind, 4, projection=16).fit(datamodule, module.latents)
    x, _, latents = next(iter(datamodule.train_dataloader()))
    experts = part(x, latents)
    assert experts.shape == (x.shape[0],) and experts.min() >= 0 and experts.max() < 4
    assert torch.equal(experts, part(x, latents))  # a fixed partition
    assert len(experts.unique()) > 1


def test_a_model_without_a_separate_gate_is_refused(tmp_path):
    datamodule, module, trainer = seeded_build(compose_config([*SMALL, "model=vmoe"]), tmp_path)
    with pytest.raises(
        ConfigError, match=r"strategy=em needs a model \(a separate gate.*not VisionMoE"
    ):
        EMStrategy().fit(trainer, module, datamodule)


def test_em_runs_from_the_cli_and_tags_its_rows(app, tmp_path):
    out = app(*SMALL, "strategy=em", "trainer.max_epochs=1")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader((single_run_dir(tmp_path) / "metrics.csv").open()))
    assert {r["stage"] for r in rows} == {"em"}
    assert any(r.get("train/em_gate_ce") for r in rows)


# -- resuming a staged run --------------------------------------------------------------
THREE_STAGES = (
    "strategy.stages=[{train: experts, epochs: 1, lr: 0.01},"
    " {train: gate, epochs: 2, lr: 0.01}, {train: all, epochs: 1, lr: 0.001}]"
)


class Interrupt(L.Callback):
    """Saves a checkpoint after the first epoch of stage 2 and stops the run there."""

    def __init__(self, path):
        self.path = path

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == 1:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


class ResumeWatch(L.Callback):
    """Per epoch after the plan entered its stage: the stage, the stage-2 optimiser's step
    count, and whether the experts were left untouched."""

    def __init__(self):
        self.epochs = []

    def on_train_epoch_start(self, trainer, module):
        gate = stage_parameters(module.model, "gate")[0]
        state = trainer.optimizers[1].state.get(gate, {})
        self.steps = float(state["step"]) if "step" in state else 0.0
        self.experts = _snapshot(stage_parameters(module.model, "experts"))

    def on_train_epoch_end(self, trainer, module):
        same = _same(self.experts, stage_parameters(module.model, "experts"))
        self.epochs.append((trainer.current_epoch, module.stage, self.steps, same))


def _staged(run_dir, stages=THREE_STAGES):
    cfg = compose_config([*SMALL, "strategy=hierarchical", stages])
    datamodule, module, trainer = seeded_build(cfg, run_dir)
    strategy = instantiate(cfg.strategy)
    return datamodule, module, trainer, strategy


def test_a_run_interrupted_in_stage_2_resumes_in_stage_2(tmp_path):
    ckpt = tmp_path / "interrupted.ckpt"
    datamodule, module, trainer, strategy = _staged(tmp_path / "a")
    trainer.callbacks.insert(0, Interrupt(ckpt))
    strategy.fit(trainer, module, datamodule)
    assert trainer.current_epoch == 2 and module.stage == "gate"
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["HierarchicalStrategy"]
    assert saved == {"stage": 1, "stages": ["experts", "gate", "all"]}

    datamodule, module, trainer, strategy = _staged(tmp_path / "b")
    watch = ResumeWatch()
    trainer.callbacks.append(watch)  # after the plan: sees the stage it entered
    strategy.fit(trainer, module, datamodule, ckpt_path=str(ckpt))
    (epoch, stage, steps, experts_same), last = watch.epochs
    assert (epoch, stage) == (2, "gate")  # the second epoch of stage 2, not a restart
    assert steps == 4  # stage 2's optimiser state came back (4 batches in epoch 1)
    assert experts_same  # and its freezing
    assert last[:2] == (3, "all")


def test_resuming_under_another_stage_plan_is_refused(tmp_path):
    ckpt = tmp_path / "interrupted.ckpt"
    datamodule, module, trainer, strategy = _staged(tmp_path / "a")
    trainer.callbacks.insert(0, Interrupt(ckpt))
    strategy.fit(trainer, module, datamodule)
    datamodule, module, trainer, strategy = _staged(tmp_path / "b", TWO_STAGES)
    with pytest.raises(ConfigError, match=r"cannot resume.*\['experts', 'route'\]"):
        strategy.fit(trainer, module, datamodule, ckpt_path=str(ckpt))


# -- EM alternation schedule ------------------------------------------------------------
def test_em_epoch_schedule_alternates_experts_and_gate_with_the_other_side_frozen(tmp_path):
    cfg = compose_config([*SMALL, "strategy=em", "strategy.schedule=epoch", "trainer.max_epochs=3"])
    trainer, _, watch = watched_fit(cfg, tmp_path)
    assert [e["stage"] for e in watch.epochs] == ["em_experts", "em_gate", "em_experts"]
    assert len(trainer.optimizers) == 2  # one per side, each kept across its epochs
    experts_epoch, gate_epoch, _ = watch.epochs
    assert experts_epoch["gate_same"] and not experts_epoch["experts_same"]
    assert gate_epoch["experts_same"] and not gate_epoch["gate_same"]
    assert not gate_epoch["holds_experts"] and not experts_epoch["holds_gate"]
    assert not (tmp_path / "checkpoints" / "stage1_em_experts.ckpt").exists()
    with pytest.raises(ConfigError, match=r"strategy\.schedule='sometimes'"):
        validate(compose_config(["strategy=em", "strategy.schedule=sometimes"]))


def test_em_batch_schedule_trains_both_sides_every_epoch_with_router_groups(tmp_path):
    cfg = compose_config(
        [*SMALL, "strategy=em", "optim.router_lr=0.01", "optim.router_weight_decay=0.5"]
    )
    datamodule, module, trainer = seeded_build(cfg, tmp_path)
    watch = StageWatch()
    trainer.callbacks.insert(0, watch)
    EMStrategy().fit(trainer, module, datamodule)
    (epoch,) = watch.epochs
    assert epoch["stage"] == "em" and not epoch["experts_same"] and not epoch["gate_same"]
    (optimizer,) = trainer.optimizers
    gate = {id(p) for p in stage_parameters(module.model, "gate")}
    router_group, rest = optimizer.param_groups
    assert {id(p) for p in router_group["params"]} == gate
    assert router_group["weight_decay"] == 0.5 and rest["weight_decay"] == 1e-4
    assert router_group["initial_lr"] == 0.01 / 25 and rest["initial_lr"] == 0.003 / 25
