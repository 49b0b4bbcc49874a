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
    """A last, smaller batch counts for its size, in the accuracy and in every value; values
    of mixed dtypes (a bf16 loss beside float32 aux losses) sum in float64."""
    from moe_exp.training.step_sums import StepSums

    sums = StepSums(("loss", "aux"))
    right = torch.tensor([[0.0, -9.0]]).repeat(1000, 1)  # predicts class 0
    sums.update(right, torch.zeros(1000, dtype=torch.long), [torch.tensor(1.0), torch.tensor(2.0)])
    sums.update(
        right[:10],
        torch.ones(10, dtype=torch.long),  # all wrong
        [torch.tensor(3.0, dtype=torch.bfloat16), torch.tensor(4.0)],
    )
    correct, inputs, loss, aux = sums.compute().tolist()
    assert (correct, inputs) == (1000, 1010)
    assert abs(loss / inputs - 1030 / 1010) < 1e-12
    assert abs(aux / inputs - 2040 / 1010) < 1e-12


def test_a_stage_that_logs_other_values_keeps_each_values_own_mean():
    """Staged strategies log extra values in some stages: each value's epoch mean is over
    the batches that logged it, and the accuracy over all of them."""
    _, module = build_components(compose_config(TINY))
    logits = torch.tensor([[0.0, -9.0]])
    zero, one = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long)
    module.record_step("train", logits.repeat(3, 1), zero.repeat(3), {"loss": torch.tensor(1.0)})
    module.record_step(
        "train", logits, one, {"loss": torch.tensor(5.0), "gate_ce": torch.tensor(7.0)}
    )
    module.log = lambda *args, **kwargs: None  # outside a Trainer: nothing to log to
    values = module._log_epoch_means("train")
    assert values == {"acc": 0.75, "loss": (3 * 1.0 + 5.0) / 4, "gate_ce": 7.0}
    assert module._log_epoch_means("train") == {}  # reset for the next epoch


def test_a_batch_already_on_the_device_is_handed_on_as_it_is():
    _, module = build_components(compose_config(TINY))
    batch = (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, 1))
    assert module.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch
    # to another device (meta stands in for a GPU here): every tensor moves, the kind stays
    moved = module.transfer_batch_to_device(list(batch), torch.device("meta"), 0)
    assert type(moved) is list and all(t.device.type == "meta" for t in moved)
    assert [t.shape for t in moved] == [t.shape for t in batch]
    other = {"x": torch.zeros(1)}  # anything else: Lightning's own transfer
    assert module.transfer_batch_to_device(other, torch.device("meta"), 0)["x"].is_meta
