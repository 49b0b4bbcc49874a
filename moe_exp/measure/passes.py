"""One evaluation pass over a split's images: eval mode (no dropout, no gate noise), no
gradients, in batches on the model's device, the model's mode restored afterwards. The
accuracy, capacity and routing-table measurements all read the model through it."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn


@torch.no_grad()
def eval_batches(
    model: nn.Module, images: Tensor, batch_size: int
) -> Iterator[tuple[int, Tensor, list]]:
    """(offset of the batch, log-probabilities, routing records) for each batch."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            log_probs, routings = model(images[start : start + batch_size].to(device))
            yield start, log_probs, routings
    finally:
        model.train(was_training)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int) -> float:
    """The fraction of ``images`` whose most probable class is their label."""
    correct = sum(
        int((log_probs.argmax(-1).cpu() == labels[start : start + len(log_probs)]).sum())
        for start, log_probs, _ in eval_batches(model, images, batch_size)
    )
    return correct / max(len(labels), 1)
