"""A training step's metrics and routing statistics stay on the model's device: counted
device-to-host reads (``item``, ``cpu``, ``tolist``, ``numpy``, and a tensor's ``bool``,
``float`` or ``int``) are the same for the whole step as for the model's forward alone
(whose sparse dispatch reads the per-expert counts to split the batch)."""

import torch

from moe_exp.app.build import build_components
from tests.conftest import TINY, compose_config

READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")


def _counting(monkeypatch):
    calls = {"n": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_metrics_and_routing_statistics_read_nothing_back_per_step(monkeypatch):
    torch.manual_seed(0)
    datamodule, module = build_components(compose_config(TINY))
    module.train()
    batch = next(iter(datamodule.train_dataloader()))
    module.step_batch(batch, "train")  # creates the metric accumulators
    calls = _counting(monkeypatch)
    with torch.no_grad():
        module.model(batch[0])
    forward = calls["n"]
    calls["n"] = 0
    module.step_batch(batch, "train")
    assert calls["n"] == forward, f"{calls['n'] - forward} reads beyond the forward's {forward}"
    # and the epoch's sums still come out right, in one transfer
    stats = module.routing_stats["train"][0].compute()
    assert abs(sum(stats[f"load_e{e}"] for e in range(4)) - 1) < 1e-9


def test_the_divergence_guard_reads_the_device_every_few_steps(monkeypatch):
    import pytest

    from moe_exp.errors import DivergedError
    from moe_exp.training.module import DIVERGENCE_CHECK_EVERY

    _, module = build_components(compose_config(TINY))
    calls = _counting(monkeypatch)
    module.check_finite(torch.tensor(float("nan")))  # kept on the device, not read yet
    for _ in range(DIVERGENCE_CHECK_EVERY - 2):
        module.check_finite(torch.tensor(1.0))
    assert calls["n"] == 0
    with pytest.raises(DivergedError, match="the loss became nan at epoch 0, within the 20"):
        module.check_finite(torch.tensor(float("nan")))


def test_epoch_means_weigh_each_batch_by_its_size():
    """A last, smaller batch counts for its size (torchmetrics' MeanMetric without its NaN
    scan would drop the weights)."""
    from moe_exp.training.module import WeightedMean

    mean = WeightedMean()
    mean.update(torch.tensor(1.0), 1000)
    mean.update(torch.tensor(3.0), 10)
    assert abs(float(mean.compute()) - 1030 / 1010) < 1e-12
