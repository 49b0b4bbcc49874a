"""Expert networks. Each takes ``(in_shape, num_outputs, ...)`` so any expert fits any mixture.

``in_shape`` is the per-sample input shape, (C, H, W) for images or (D,) for features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn


class MLPExpert(nn.Module):
    """Flatten, then ``depth`` hidden layers of ReLU units, then a linear read-out."""

    def __init__(
        self,
        in_shape: Sequence[int],
        num_outputs: int,
        hidden: int = 128,
        depth: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(in_shape)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(max(1, channels // 8), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r} is not one of batch, group, none")


class CNNExpert(nn.Module):
    """A small CNN classifier: three 3×3 conv stages (the first two stride 2), global pooling.

    Strided convolutions keep it cheap (~1 M multiply-adds on 32×32 at width 16), so a
    mixture of several stays fast on a CPU.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_outputs: int,
        width: int = 16,
        norm: str = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels = in_shape[0]
        widths = (width, 2 * width, 2 * width)
        strides = (2, 2, 1)
        layers: list[nn.Module] = []
        for w, s in zip(widths, strides, strict=True):
            layers += [
                nn.Conv2d(channels, w, 3, stride=s, padding=1, bias=norm == "none"),
                _norm(norm, w),
                nn.ReLU(),
            ]
            channels = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_outputs))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
