"""Expert surgery on a trained mixture: grow, shrink, replace, retrain one part, move an
expert between mixtures (moe_exp/training/surgery.py)."""

import pytest
import torch

from moe_exp.app.build import build_components
from moe_exp.app.config import instantiate
from moe_exp.errors import ConfigError
from moe_exp.moe.experts import CNNExpert, MLPExpert
from moe_exp.training.strategies import JointStrategy
from moe_exp.training.surgery import (
    Surgery,
    expert_state,
    load_expert,
    resize_router,
    unchanged_experts,
)
from tests.conftest import TINY, compose_config, seeded_build

# CNN experts: BatchNorm buffers too must survive a frozen run untouched.
CNN_TINY = [*TINY, "expert.width=8"]


def _overrides(*extra):
    return [*CNN_TINY, *extra]


def _train(run_dir, *extra, epochs=1, before_fit=None):
    """Build (seed 0) and fit jointly; ``before_fit(module)`` sees the module untrained."""
    cfg = compose_config(_overrides(f"trainer.max_epochs={epochs}", *extra))
    datamodule, module, trainer = seeded_build(cfg, run_dir)
    if before_fit is not None:
        before_fit(module)
    JointStrategy().fit(trainer, module, datamodule)
    return module, trainer


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained 4-expert mixture, as a run folder with checkpoints/best.ckpt."""
    run_dir = tmp_path_factory.mktemp("source")
    module, _ = _train(run_dir)
    return run_dir, [_state(e) for e in module.model.moe.experts], _state(module.model)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_added_expert_and_gate_retrain_while_the_others_stay_bit_identical(source, tmp_path):
    run_dir, experts, _ = source
    untrained = {}
    module, _ = _train(
        tmp_path,
        f"surgery.init_from={run_dir}",
        "surgery.add=1",
        "surgery.train=[new,gate]",
        before_fit=lambda m: untrained.update(_state(m.model.moe.experts[4])),
    )
    model = module.model
    assert len(model.moe.experts) == 5 and model.moe.router.num_experts == 5
    for before, expert in zip(experts, model.moe.experts, strict=False):
        assert _same(before, expert.state_dict())  # parameters and BatchNorm statistics
    assert not _same(untrained, model.moe.experts[4].state_dict())  # the new expert trained
    # what the run's summary reports of it
    assert unchanged_experts(model, module.old_experts) == {
        "surgery/old_experts": 4,
        "surgery/old_experts_unchanged": 4,
    }
    # the routing record of the retrained mixture: the new expert takes part of the load
    val = module.history["val"][-1]
    assert val["load_e4"] > 0 and val["seen_e4"] > 0
    assert sum(val[f"load_e{i}"] for i in range(5)) == pytest.approx(1.0)


def test_fine_tuning_everything_after_adding_an_expert_changes_the_old_ones(source, tmp_path):
    run_dir, experts, _ = source
    module, _ = _train(tmp_path, f"surgery.init_from={run_dir}", "surgery.add=1")
    assert all(
        not _same(b, e.state_dict())
        for b, e in zip(experts, module.model.moe.experts[:4], strict=True)
    )
    assert unchanged_experts(module.model, module.old_experts) == {
        "surgery/old_experts": 4,
        "surgery/old_experts_unchanged": 0,
    }


def test_router_rows_are_kept_when_experts_are_removed_or_added(source, tmp_path):
    run_dir, experts, model_state = source
    cfg = compose_config(_overrides(f"surgery.init_from={run_dir}", "surgery.remove=[1]"))
    _, module = build_components(cfg)
    model = module.model
    assert len(model.moe.experts) == 3
    for new, old in zip(model.moe.experts, (0, 2, 3), strict=True):
        assert _same(new.state_dict(), experts[old])
    for name in ("proj.weight", "noise.weight", "proj.bias"):
        old = model_state[f"moe.router.{name}"]
        torch.testing.assert_close(model.moe.router.state_dict()[name], old[[0, 2, 3]])
    log_probs, (routing,) = model(torch.rand(8, 3, 32, 32))
    assert routing.num_experts == 3 and torch.isfinite(log_probs).all()


def test_resize_router_copies_the_expert_axis_and_keeps_fresh_rows():
    from moe_exp.moe.gates import CosineGate, TopKGate

    old, new = TopKGate(6, 3, k=1), TopKGate(6, 4, k=1)
    before = new.proj.weight.detach().clone()
    resize_router(old, new, [2, 0, None, 1])
    torch.testing.assert_close(new.proj.weight[[0, 1, 3]], old.proj.weight[[2, 0, 1]])
    torch.testing.assert_close(new.proj.bias[[0, 1, 3]], old.proj.bias[[2, 0, 1]])
    assert torch.equal(new.proj.weight[2], before[2])  # a new expert's row stays fresh
    cos_old, cos_new = CosineGate(6, 3, k=1), CosineGate(6, 2, k=1)
    resize_router(cos_old, cos_new, [1, 2])
    torch.testing.assert_close(cos_new.expert_embeddings, cos_old.expert_embeddings[[1, 2]])
    torch.testing.assert_close(cos_new.proj.weight, cos_old.proj.weight)  # no expert axis


def test_replaced_expert_is_fresh_of_another_kind_and_takes_load(source, tmp_path):
    run_dir, experts, model_state = source
    module, _ = _train(
        tmp_path,
        f"surgery.init_from={run_dir}",
        "surgery.replace=[2]",
        "surgery.expert=mlp",
        "surgery.train=[new]",
    )
    model = module.model
    assert isinstance(model.moe.experts[2], MLPExpert)
    assert all(isinstance(model.moe.experts[i], CNNExpert) for i in (0, 1, 3))
    for i in (0, 1, 3):
        assert _same(model.moe.experts[i].state_dict(), experts[i])
    router = {k[len("moe.router.") :]: v for k, v in model_state.items() if "router" in k}
    assert _same(model.moe.router.state_dict(), router)  # the gate was frozen
    assert module.history["val"][-1]["load_e2"] > 0  # the slot's inputs reach the new expert


def test_one_expert_moves_into_another_mixture_with_identical_outputs(source):
    run_dir, experts, _ = source
    _, target = build_components(compose_config(_overrides("experts=6", "k=2")))
    state = expert_state(run_dir / "checkpoints" / "best.ckpt", 1)
    assert _same(state, experts[1])
    load_expert(target.model, 5, state)
    _, original = build_components(compose_config(_overrides(f"surgery.init_from={run_dir}")))
    x = torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    a, b = original.model.moe.experts[1].eval(), target.model.moe.experts[5].eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert not torch.equal(a(x), target.model.moe.experts[4].eval()(x))


def test_graft_override_copies_an_expert_from_a_checkpoint(source):
    run_dir, experts, _ = source
    graft = f"surgery.graft=[{{from: {run_dir}, expert: 3, into: 0}}]"
    cfg = compose_config(_overrides(f"surgery.init_from={run_dir}", graft))
    _, module = build_components(cfg)
    assert _same(module.model.moe.experts[0].state_dict(), experts[3])


def test_checkpoints_index_their_experts(source):
    run_dir, _, _ = source
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert [e["kind"] for e in checkpoint["experts"]] == ["CNNExpert"] * 4
    assert checkpoint["experts"][2]["prefix"] == "model.moe.experts.2."


def test_retraining_one_expert_freezes_the_rest_out_of_the_optimiser(source, tmp_path):
    run_dir, _, _ = source
    cfg = compose_config(_overrides(f"surgery.init_from={run_dir}", "surgery.train=[2]"))
    _, module = build_components(cfg)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in module.model.moe.experts[2].parameters()}
    module.trainer = None
    groups = module.param_groups(list(module.parameters()), lr=0.01)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in trainable}


STAGES = (
    "strategy.stages=[{train: experts, epochs: 1, lr: 0.01}, {train: gate, epochs: 1, lr: 0.01}]"
)


def _hierarchical(run_dir, tmp_path, train):
    cfg = compose_config(
        _overrides(
            f"surgery.init_from={run_dir}",
            f"surgery.train={train}",
            "strategy=hierarchical",
            "strategy.partition=random",
            STAGES,
        )
    )
    datamodule, module, trainer = seeded_build(cfg, tmp_path)
    strategy = instantiate(cfg.strategy)
    return strategy, trainer, module, datamodule


def test_staged_training_keeps_what_surgery_froze_frozen(source, tmp_path):
    run_dir, experts, _ = source
    strategy, trainer, module, datamodule = _hierarchical(run_dir, tmp_path, "[1,gate]")
    strategy.fit(trainer, module, datamodule)
    model = module.model
    assert not _same(model.moe.experts[1].state_dict(), experts[1])
    for i in (0, 2, 3):
        assert _same(model.moe.experts[i].state_dict(), experts[i])
        assert not any(p.requires_grad for p in model.moe.experts[i].parameters())
    strategy, trainer, module, datamodule = _hierarchical(run_dir, tmp_path, "[gate]")
    with pytest.raises(ConfigError, match="stage 'experts' trains experts, but all of it"):
        strategy.fit(trainer, module, datamodule)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["experts=8"], r"the checkpoint \(4 mixture experts\) does not fit"),
        (["surgery.remove=[7]"], "expert 7 is out of range"),
        (["surgery.train=[router]"], r"\['router'\] not understood"),
        (["surgery.expert=hexagon"], "surgery.expert='hexagon' is not one of"),
        (["surgery.train=[9]"], "names expert 9; the mixture has 4"),
    ],
)
def test_bad_surgery_fails_with_the_key(source, extra, message):
    run_dir, _, _ = source
    cfg = compose_config(_overrides(f"surgery.init_from={run_dir}", *extra))
    with pytest.raises(ConfigError, match=message):
        build_components(cfg)


def test_edits_need_a_trained_mixture():
    with pytest.raises(ConfigError, match=r"set surgery\.init_from"):
        Surgery(add=1)
    with pytest.raises(ConfigError, match="not found"):
        build_components(compose_config(_overrides("surgery.init_from=/nonexistent/run")))
