"""Experts on the flattened input: linear and MLP classifiers.

Every expert takes ``(in_shape, num_outputs, ...)``, so any expert fits any mixture;
``in_shape`` is (C, H, W) for images or (D,) for features. Every expert has ``dropout``
inside it (after each hidden layer, or on the input without one): Switch Transformers
(Fedus et al. 2021, sec. 2.4) found a higher dropout inside experts helps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn


def check_dropout(p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    return float(p)


def image_shape(in_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) for an image, (1, 1, D) for a feature vector (a one-row image)."""
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) == 3:
        return in_shape  # type: ignore[return-value]
    if len(in_shape) == 2:
        return (1, *in_shape)
    if len(in_shape) == 1:
        return (1, 1, in_shape[0])
    raise ValueError(f"in_shape must be (C, H, W), (H, W) or (D,), got {in_shape}")


class LinearExpert(nn.Module):
    """A linear classifier on the flattened input; dropout (no hidden layer) on its input."""

    def __init__(self, in_shape: Sequence[int], num_outputs: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(check_dropout(dropout)),
            nn.Linear(math.prod(in_shape), num_outputs),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MLPExpert(nn.Module):
    """Flatten, then ``depth`` hidden layers of ReLU units (each followed by dropout), then a
    linear read-out."""

    def __init__(
        self,
        in_shape: Sequence[int],
        num_outputs: int,
        hidden: int = 128,
        depth: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dropout = check_dropout(dropout)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(in_shape)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
