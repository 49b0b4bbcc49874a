"""Evaluation without the training capacity limit, and the test accuracy under it."""

import functools

import torch

from moe_exp.measure.capacity import at_training_capacity, limited_routers
from moe_exp.models import MixtureClassifier
from moe_exp.moe.experts import MLPExpert
from moe_exp.moe.gates.topk import TopKGate


def _model(**gate):
    torch.manual_seed(0)
    return MixtureClassifier(
        (3, 8, 8),
        3,
        4,
        functools.partial(MLPExpert, hidden=8),
        functools.partial(TopKGate, k=2, **gate),
        channels_last=False,
    ).eval()


def test_a_run_trained_under_a_limit_is_also_tested_under_it():
    model = _model(capacity_factor=0.5)
    x, y = torch.randn(48, 3, 8, 8), torch.arange(48) % 3
    _, (free,) = model(x)
    assert free.dropped == 0 and free.capacity is None  # evaluation: no limit by default
    out = at_training_capacity(model, x, y, batch_size=12)
    # capacity ceil(0.5·2·12/4) = 3 per expert per batch of 12: at most 12 of 24 kept
    assert out["test/dropped_fraction_at_train_capacity"] >= 0.5
    assert 0.0 <= out["test/acc_at_train_capacity"] <= 1.0
    _, (after,) = model(x)
    assert after.dropped == 0 and not model.training  # the evaluation limit is restored


def test_no_second_test_without_a_training_limit_or_when_the_limits_agree():
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 3
    assert at_training_capacity(_model(), x, y, batch_size=4) == {}
    same = _model(capacity_factor=1.0, eval_capacity_factor=1.0)
    assert limited_routers(same) == [] and at_training_capacity(same, x, y, 4) == {}
