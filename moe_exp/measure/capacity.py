"""Test accuracy with the training capacity limit applied, beside the evaluation's own.

Evaluation has its own limit (``eval_capacity_factor``, none by default) because the limit
is a share of the batch, and evaluation batches are larger than training ones. A run trained
under a limit is also tested under it, in batches of the training size, so both numbers are
in its record: what the model knows, and what it delivers under the training budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from moe_exp.measure.passes import eval_batches
from moe_exp.moe.gates.router import Router

# what a run trained under a capacity limit adds to its test metrics
NAMES = ("acc_at_train_capacity", "dropped_fraction_at_train_capacity")


def limited_routers(model: nn.Module) -> list[Router]:
    """The routers whose training limit differs from their evaluation limit."""
    return [
        m
        for m in model.modules()
        if isinstance(m, Router)
        and m.capacity_factor is not None
        and m.eval_capacity_factor != m.capacity_factor
    ]


@contextmanager
def training_capacity(model: nn.Module) -> Iterator[None]:
    """Evaluate under each router's training capacity limit inside the block."""
    routers = limited_routers(model)
    saved = [r.eval_capacity_factor for r in routers]
    for r in routers:
        r.eval_capacity_factor = r.capacity_factor
    try:
        yield
    finally:
        for r, factor in zip(routers, saved, strict=True):
            r.eval_capacity_factor = factor


def at_training_capacity(
    model: nn.Module, images: Tensor, labels: Tensor, batch_size: int, prefix: str = "test"
) -> dict[str, float]:
    """``{prefix}/acc_at_train_capacity`` and its dropped fraction; empty when training had
    no limit of its own."""
    if not limited_routers(model):
        return {}
    correct, dropped, assignments = 0, 0, 0
    with training_capacity(model):
        for start, log_probs, routings in eval_batches(model, images, batch_size):
            y = labels[start : start + len(log_probs)]
            correct += int((log_probs.argmax(-1).cpu() == y).sum())
            dropped += sum(int(r.dropped) for r in routings)
            assignments += sum(r.indices.numel() for r in routings)
    return {
        f"{prefix}/{NAMES[0]}": correct / max(len(labels), 1),
        f"{prefix}/{NAMES[1]}": dropped / max(assignments, 1),
    }
