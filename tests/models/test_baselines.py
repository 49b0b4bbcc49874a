"""Dense baselines matched to the mixture, and the overfitting controls: router parameter
groups, early stopping, train−val gaps and per-expert records."""

import csv
import json
import math

import pytest
import torch

from moe_exp.app.build import build_components, build_model
from moe_exp.app.config import validate
from moe_exp.errors import ConfigError
from moe_exp.measure.cost import flops_per_sample
from moe_exp.models import DenseBaseline, match_width
from moe_exp.training.optim import router_parameters
from moe_exp.training.strategies import JointStrategy
from tests.conftest import TINY, compose_config, seeded_build

IN_SHAPE, CLASSES = (3, 32, 32), 16


def _model(overrides):
    return build_model(compose_config(overrides), IN_SHAPE, CLASSES)


@pytest.mark.parametrize("expert", ["cnn", "mlp"])
@pytest.mark.parametrize(("experts", "k"), [(4, 1), (4, 2), (8, 1), (8, 2)])
def test_dense_baselines_match_the_mixture_within_ten_percent(expert, experts, k):
    base = [f"expert={expert}", f"experts={experts}", f"k={k}"]
    torch.manual_seed(0)
    mixture = _model(base)
    x = torch.randn(16, *IN_SHAPE)
    moe_flops = flops_per_sample(mixture, x)["flops_active"]
    moe_params = mixture.parameter_counts()["params_total"]
    by_flops = _model([*base, "model=dense_flops"])
    by_params = _model([*base, "model=dense_params"])
    assert isinstance(by_flops, DenseBaseline) and isinstance(by_params, DenseBaseline)
    dense_flops = flops_per_sample(by_flops, x)["flops_active"]
    assert abs(dense_flops / moe_flops - 1) <= 0.10, (dense_flops, moe_flops)
    assert abs(by_params.parameter_counts()["params_total"] / moe_params - 1) <= 0.10
    # the two targets differ: a sparse mixture runs far fewer FLOPs than its parameters
    assert by_params.width > by_flops.width
    log_probs, routings = by_flops(x)
    assert routings == [] and log_probs.shape == (16, CLASSES)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(16))


def test_dense_baseline_follows_the_mixture_keys():
    narrow = _model(["model=dense_params", "model.gate_width=4"]).parameter_counts()
    wide = _model(["model=dense_params", "model.gate_width=64"]).parameter_counts()
    assert wide["params_total"] > narrow["params_total"]


def test_match_width_picks_the_nearest_width():
    assert match_width(lambda w: float(w * w), 1000.0) == 32  # 32² = 1024 beats 31² = 961
    assert match_width(lambda w: 10.0 * w, 55.0) in (5, 6)
    assert match_width(lambda w: 10.0 * w, 1.0) == 1


def test_dense_baseline_needs_a_scalable_expert():
    with pytest.raises(Exception, match="LinearExpert has no width or hidden argument"):
        _model(["model=dense_flops", "expert=linear"])


@pytest.mark.slow  # the baselines are built and matched in-process above
def test_dense_baselines_train_from_the_cli(app, tmp_path):
    out = app("-m", *TINY, "trainer.max_epochs=2", "model=dense_flops,dense_params")
    assert out.returncode == 0, out.stderr[-2000:]
    summaries = sorted(tmp_path.glob("outputs/multiruns/*/*/*/summary.json"))
    assert len(summaries) == 2
    for path in summaries:
        summary = json.loads(path.read_text())
        assert summary["status"] == "completed"
        assert summary["params_total"] == summary["params_active"]
        assert summary["dense_width"] >= 1 and abs(summary["dense_match_error"]) <= 0.10
        assert not any(k.endswith("cv_load") for k in summary)  # no routing, no balance
        rows = csv.DictReader((path.parent / "metrics.csv").open())
        losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
        assert len(losses) == 2 and losses[1] < losses[0]  # it trains


# -- overfitting controls -------------------------------------------------------------
def test_router_gets_its_own_learning_rate_and_weight_decay():
    cfg = compose_config([*TINY, "optim.router_lr=0.01", "optim.router_weight_decay=0.5"])
    _, module = build_components(cfg)
    routing = {id(p) for p in router_parameters(module.model)}
    assert routing and len(routing) < len(list(module.parameters()))
    groups = module.param_groups(list(module.parameters()), lr=0.003, router_lr=0.01)
    (router,) = [g for g in groups if id(g["params"][0]) in routing]
    (rest,) = [g for g in groups if id(g["params"][0]) not in routing]
    assert {id(p) for p in router["params"]} == routing
    assert (router["lr"], router["weight_decay"]) == (0.01, 0.5)
    assert (rest["lr"], rest["weight_decay"]) == (0.003, cfg.optim.weight_decay)
    # a stage's own weight decay rules both groups
    staged = module.param_groups(list(module.parameters()), lr=0.1, weight_decay=0.0)
    assert [g["weight_decay"] for g in staged] == [0.0, 0.0]


@pytest.mark.parametrize(("value", "key"), [(0.0, "router_lr"), (-1.0, "router_weight_decay")])
def test_bad_router_settings_are_refused(value, key):
    cfg = compose_config([*TINY, f"optim.{key}={value}"])
    with pytest.raises(ConfigError, match=f"optim.{key}"):
        validate(cfg)


@pytest.fixture(scope="module")
def early_stopped(tmp_path_factory):
    """A mixture with early stopping that cannot see an improvement (min_delta 1 on an
    accuracy): it must stop after the second epoch of four."""
    run_dir = tmp_path_factory.mktemp("early")
    cfg = compose_config(
        [
            *TINY,
            "expert=mlp",
            "trainer.max_epochs=4",
            "callbacks=early_stopping",
            "callbacks.early_stopping.patience=0",
            "callbacks.early_stopping.min_delta=1.0",
        ]
    )
    datamodule, module, trainer = seeded_build(cfg, run_dir)
    JointStrategy().fit(trainer, module, datamodule)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    return trainer, module, rows


def test_early_stopping_stops_a_run(early_stopped):
    trainer, module, _ = early_stopped
    assert trainer.max_epochs == 4
    assert trainer.current_epoch == 2 and len(module.history["train"]) == 2


def _epoch_rows(rows):
    """One merged dict per epoch (Lightning may spread an epoch over several CSV rows)."""
    merged = {}
    for row in rows:
        merged.setdefault(row["epoch"], {}).update({k: v for k, v in row.items() if v != ""})
    return [merged[e] for e in sorted(merged, key=int)]


def test_gaps_are_recorded_every_epoch(early_stopped):
    _, module, rows = early_stopped
    epochs = _epoch_rows(rows)
    assert len(epochs) == 2
    for row, train, val in zip(epochs, module.history["train"], module.history["val"], strict=True):
        assert math.isclose(float(row["gap/acc"]), train["acc"] - val["acc"], abs_tol=1e-6)
        assert math.isclose(float(row["gap/loss"]), val["ce"] - train["ce"], abs_tol=1e-6)
    last = module.last_epoch()  # what summary.json gets
    assert last["gap/acc"] == pytest.approx(float(epochs[-1]["gap/acc"]))
    assert last["train/acc"] == pytest.approx(float(epochs[-1]["train/acc"]))


def test_each_expert_records_accuracy_and_samples_seen_in_train_and_val(early_stopped):
    _, module, rows = early_stopped
    epochs = _epoch_rows(rows)
    k = module.model.moe.router.k
    for split, n in (("train", 256), ("val", 128)):
        seen = [float(epochs[-1][f"{split}/seen_e{i}"]) for i in range(4)]
        assert sum(seen) == k * n  # every input's k assignments, counted once
        for i in range(4):
            acc = epochs[-1].get(f"{split}/acc_e{i}")
            assert acc is not None and (seen[i] == 0 or 0.0 <= float(acc) <= 1.0)
