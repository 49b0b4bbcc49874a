"""A split's per-epoch sums of what each training, validation or test step reports."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class StepSums(Metric):
    """A split's sums over an epoch: correct predictions, inputs, and each named step value
    times its batch size (so a last, smaller batch counts for its size), in tensors on the
    device that torchmetrics sums across processes. One update per step: a torchmetrics
    metric per value costs an update call each, a large share of a small model's step, and
    MeanMetric scans every update for NaN, a host read (the divergence guard watches the loss
    for NaN instead)."""

    full_state_update = False

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names
        for state, size in (("correct", ()), ("inputs", ()), ("totals", (len(names),))):
            self.add_state(state, torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, log_probs: Tensor, y: Tensor, values: list[Tensor]) -> None:
        n = y.shape[0]
        self.correct += (log_probs.detach().argmax(-1) == y).sum()
        self.inputs += n
        if values:
            self.totals += torch.stack([v.detach() for v in values]).double() * n

    def compute(self) -> Tensor:
        """[correct, inputs, *totals], summed over processes."""
        return torch.cat([self.correct.view(1), self.inputs.view(1), self.totals])
