import pytest
import torch

from moe_exp.app.build import build_components
from moe_exp.app.config import validate
from moe_exp.errors import ConfigError
from tests.conftest import QUICK, compose_config, config_options
from tests.data.disk_formats import ON_DISK, write

# Each option builds and runs a batch; the presets (experiment=...) pin keys of the options
# already run here, and are composed and checked in the default suite, built in the slow one.
# mnist_5k reads its bundled files, as tests/data/test_bundled.py does in the default suite.
SLOW_BUILDS = {("data", "mnist_5k")}
OPTIONS = [
    pytest.param(*o, marks=pytest.mark.slow) if o[0] == "experiment" or o in SLOW_BUILDS else o
    for o in config_options()
    if o[0] not in ("trainer", "logger", "debug", "paths")
]


def test_every_group_has_options():
    groups = {g for g, _ in config_options()}
    assert {
        "data",
        "expert",
        "gate",
        "regularizer",
        "strategy",
        "model",
        "trainer",
        "logger",
        "experiment",
    } <= groups


# Options that need a partner to be valid (the rules below say why).
PARTNERS = {("regularizer", "tree_balance"): ["expert=tree"]}


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_option_composes_instantiates_and_runs_a_batch(group, option, tmp_path):
    extra = list(PARTNERS.get((group, option), []))
    if group == "data" and option in (*ON_DISK, "image_folder"):  # real files, written small
        write(option, tmp_path)
        extra += [f"data.root={tmp_path}"]
        extra += ["data.check_md5=false"] if option in ON_DISK else []
    cfg = compose_config([*QUICK, f"{group}={option}", *extra])
    validate(cfg)
    datamodule, module = build_components(cfg)
    x, y, _ = next(iter(datamodule.train_dataloader()))
    log_probs, routings = module(x)
    assert log_probs.shape == (len(y), datamodule.num_classes)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(len(y)), atol=1e-4, rtol=0)
    if cfg.model._target_.endswith("DenseBaseline"):  # model=dense_*: no routing at all
        assert routings == []
    else:
        assert routings and routings[0].num_experts == cfg.experts


def test_top_level_scalars_reach_every_axis():
    cfg = compose_config([*QUICK, "experts=8", "k=3", "gate=topk"])
    _, module = build_components(cfg)
    router = module.model.moe.router
    assert router.num_experts == 8 and router.k == 3 and len(module.model.moe.experts) == 8


def test_regularizers_combine_as_a_list():
    cfg = compose_config([*QUICK, "regularizer=[importance,switch]"])
    assert set(cfg.regularizer) == {"importance", "switch"}
    _, module = build_components(cfg)
    assert set(module.model.moe.regularizers) == {"importance", "switch"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("experts=0", "experts=0 must be >= 1"),
        ("k=0", "k=0 must be >= 1"),
        ("k=9", "k=9 must be <= experts=4"),
        ("experts=abc", "experts='abc' has the wrong type: expected int"),
        ("optim.lr=-1", "optim.lr=-1.0 must be > 0"),
        ("optim.lr=0", "optim.lr=0.0 must be > 0"),
        ("optim.lr=fast", "optim.lr='fast' has the wrong type: expected float"),
        ("data.batch_size=0", "data.batch_size=0 must be >= 1"),
        ("data.batch_size=-8", "data.batch_size=-8 must be >= 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 must be >= 1"),
        ("optim.scheduler=linear", "optim.scheduler='linear' is not one of onecycle, cosine, none"),
        ("regularizer.importance.weight=-0.1", "regularizer.importance.weight=-0.1 must be"),
    ],
)
def test_bad_values_are_named_with_what_is_allowed(override, message):
    cfg = compose_config([override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)


def test_all_problems_are_reported_at_once():
    cfg = compose_config(["experts=0", "optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"experts=0 .*optim\.lr=-1"):
        validate(cfg)


def test_default_config_is_valid():
    validate(compose_config())


# One case per rule: (overrides, the part of the message that names key, value and rule).
RULES = [
    # probabilities and fractions
    (["expert.dropout=1.5"], "expert.dropout=1.5 must be a number in [0, 1)"),
    (["model=vmoe", "model.expert_dropout=-0.1"], "model.expert_dropout=-0.1 must be a number in"),
    (["model=vmoe", "model.dropout=1"], "model.dropout=1.0 must be a number in [0, 1)"),
    (["expert=mixed", "expert.groups.1.expert.dropout=2"], "expert.groups[1].expert.dropout=2.0"),
    (["gate=switch", "gate.jitter=1"], "gate.jitter=1.0 must be a number in [0, 1)"),
    (["data.label_noise=1"], "data.label_noise=1.0 must be a number in [0, 1)"),
    (["data.val_fraction=0"], "data.val_fraction=0.0 must be a number in (0, 1)"),
    (["data.train_fraction=1.5"], "data.train_fraction=1.5 must be a number in (0, 1]"),
    (["data.cluster_fraction=-1"], "data.cluster_fraction=-1.0 must be a number in [0, 1]"),
    # counts and sizes
    (["threads=0"], "threads=0 must be >= 1"),
    (["data.eval_batch_size=0"], "data.eval_batch_size=0 must be >= 1"),
    (["data.n_train=0"], "data.n_train=0 must be an integer >= 1 or null"),
    (["expert.width=0"], "expert.width=0 must be >= 1"),
    (["expert.width=1.5"], "expert.width=1.5 must be an integer >= 1"),
    (["expert=tree", "expert.depth=0"], "expert.depth=0 must be >= 1"),
    (["expert=mlp", "expert.depth=-1"], "expert.depth=-1 must be an integer >= 0"),
    (["expert=resnet", "expert.blocks=[1,0]"], "expert.blocks[1]=0 must be >= 1"),
    (["expert=mixed", "expert.groups.0.count=-1"], "expert.groups[0].count=-1 must be an integer"),
    (["model.shared_experts=-1"], "model.shared_experts=-1 must be an integer >= 0"),
    (["model.gate_width=0"], "model.gate_width=0 must be >= 1"),
    (["gate=soft", "gate.slots_per_expert=0"], "gate.slots_per_expert=0 must be >= 1"),
    (["strategy=em", "strategy.em_steps=0"], "strategy.em_steps=0 must be >= 1"),
    (["strategy=hierarchical", "strategy.stages.1.epochs=0"], "strategy.stages[1].epochs=0 must"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0 must be >= 1"),
    # rates, weights, temperatures
    (["optim.weight_decay=-1"], "optim.weight_decay=-1.0 must be a number >= 0"),
    (["optim.router_lr=0"], "optim.router_lr=0.0 must be a number > 0 or null"),
    (["strategy=hierarchical", "strategy.stages.0.lr=-1"], "strategy.stages[0].lr=-1.0 must be"),
    (["gate.capacity_factor=0"], "gate.capacity_factor=0.0 must be a number > 0 or null"),
    (["gate=expert_choice", "k=0"], "k=0 must be >= 1"),
    (["gate=cosine", "gate.temperature=0"], "gate.temperature=0.0 must be > 0"),
    (["gate=bias_balanced", "gate.bias_update_rate=-1"], "gate.bias_update_rate=-1.0 must be"),
    (["expert=tree", "expert.beta=0"], "expert.beta=0.0 must be > 0"),
    (["data.noise=-0.5"], "data.noise=-0.5 must be a number >= 0"),
    (["regularizer=zloss", "regularizer.zloss.weight=-1"], "regularizer.zloss.weight=-1.0 must"),
    (["expert.dropout=abc"], "expert.dropout='abc' must be a number in [0, 1)"),
    # cross-field
    (["experts=2", "k=3"], "k=3 must be <= experts=2"),
    (["regularizer=tree_balance"], "regularizer.tree_balance (tree balance) needs soft-tree"),
    (["regularizer=tree_balance", "expert=tree", "model=vmoe"], "model=vmoe ignores the"),
    (["expert=mixed", "experts=6"], "expert.groups counts [2, 2] sum to 4 but experts=6"),
    (["gate=hierarchical", "experts=6", "gate.num_groups=4"], "gate.num_groups=4 must divide"),
    (["gate=hierarchical", "k=3"], "k=3 must be <= experts per group=2 for gate=hierarchical"),
    (["gate=hierarchical", "gate.k_group=3"], "gate.k_group=3 must be <= gate.num_groups=2"),
    (["strategy=em", "model=vmoe"], "strategy=em needs model=mixture"),
    (["strategy=hierarchical", "model.shared_experts=1"], "model.shared_experts=1 is not"),
    (["objective=acc"], "objective='acc' must name a val/ or test/ metric"),
    (["objective=val/acc_"], "objective='val/acc_' is not a metric a run reports"),
    (["objective=1"], "objective=1 must name a val/ or test/ metric"),  # found by a search
]


@pytest.mark.parametrize(("overrides", "message"), RULES, ids=[" ".join(o) for o, _ in RULES])
def test_each_rule_names_the_key_the_value_and_what_is_allowed(overrides, message):
    cfg = compose_config([*QUICK, *overrides])
    with pytest.raises(ConfigError) as err:
        validate(cfg, overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("gate", ["switch", "base"])
def test_top_1_gates_refuse_an_explicit_top_k(gate):
    with pytest.raises(ConfigError, match=rf"k=2 asks for top-2 routing, but gate={gate} is top-1"):
        validate(compose_config([f"gate={gate}", "k=2"]), [f"gate={gate}", "k=2"])
    validate(compose_config([f"gate={gate}"]), [f"gate={gate}"])  # the default k is not a request
    validate(compose_config([f"gate={gate}", "k=1"]), [f"gate={gate}", "k=1"])
    validate(compose_config(["gate=topk", "k=2"]), ["gate=topk", "k=2"])


def test_valid_partners_pass():
    for overrides in (
        ["regularizer=tree_balance", "expert=tree"],
        ["expert=mixed", "experts=4"],
        ["gate=hierarchical", "experts=8", "gate.num_groups=4", "k=2"],
        ["expert=mlp", "expert.depth=0"],
        ["gate.capacity_factor=1.25"],
        ["objective=[val/acc,val/cv_load]"],
        ["strategy=hierarchical"],
    ):
        validate(compose_config([*QUICK, *overrides]), overrides)


def test_gpu_trainer_needs_a_gpu():
    if torch.cuda.is_available():
        validate(compose_config(["trainer=gpu"]))
    else:
        with pytest.raises(ConfigError, match=r"trainer\.accelerator=gpu but no CUDA GPU"):
            validate(compose_config(["trainer=gpu"]))


def test_experiment_presets_are_valid():
    for group, option in config_options():
        if group == "experiment":
            validate(compose_config([f"experiment={option}"]))
