import pytest
import torch

from moe_exp.build import build_components
from moe_exp.config import validate
from moe_exp.errors import ConfigError
from tests.conftest import QUICK, compose_config, config_options
from tests.data.disk_formats import ON_DISK, write

OPTIONS = [o for o in config_options() if o[0] not in ("trainer", "logger")]


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


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_option_composes_instantiates_and_runs_a_batch(group, option, tmp_path):
    extra = []
    if group == "data" and option in ON_DISK:  # real on-disk formats, written small
        write(option, tmp_path)
        extra = [f"data.root={tmp_path}", "data.check_md5=false"]
    cfg = compose_config([*QUICK, f"{group}={option}", *extra])
    validate(cfg)
    datamodule, module = build_components(cfg)
    x, y, _ = next(iter(datamodule.train_dataloader()))
    log_probs, routings = module(x)
    assert log_probs.shape == (len(y), datamodule.num_classes)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(len(y)), atol=1e-4, rtol=0)
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
