"""Convolutional experts: a small CNN and a ResNet (He et al. 2016) of basic blocks.

A feature vector is read as a one-row, one-channel image, so these fit any data too.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from moe_exp.moe.experts.dense import check_dropout, image_shape
from moe_exp.moe.rules import below_minimum, require


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(max(1, channels // 8), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r} is not one of batch, group, none")


class _PooledConvExpert(nn.Module):
    """Conv features → global average pool → dropout → linear read-out; flat inputs are
    reshaped to the image shape first."""

    image_shape: tuple[int, int, int]

    def finish(
        self, layers: list[nn.Module], channels: int, num_outputs: int, dropout: float
    ) -> None:
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_outputs))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            x = x.reshape(x.shape[0], *self.image_shape)
        return self.head(self.features(x))


class CNNExpert(_PooledConvExpert):
    """A small CNN classifier: three 3×3 conv stages (the first two stride 2), global pooling.

    Strided convolutions keep it cheap (~1 M multiply-adds on 32×32 at width 16), so a
    mixture of several stays fast on a CPU. Dropout follows every conv stage and precedes
    the read-out.
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
        dropout = check_dropout(dropout)
        self.image_shape = image_shape(in_shape)
        channels = self.image_shape[0]
        widths = (width, 2 * width, 2 * width)
        strides = (2, 2, 1)
        layers: list[nn.Module] = []
        for w, s in zip(widths, strides, strict=True):
            layers += [
                nn.Conv2d(channels, w, 3, stride=s, padding=1, bias=norm == "none"),
                _norm(norm, w),
                nn.ReLU(),
                nn.Dropout(dropout),
            ]
            channels = w
        self.finish(layers, channels, num_outputs, dropout)


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual connection (He et al. 2016, "Deep residual learning");
    a strided 1×1 projection on the shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, dropout: float) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = _norm(norm, c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.norm2 = _norm(norm, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias), _norm(norm, c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.norm1(self.conv1(x)).relu())
        return (self.norm2(self.conv2(h)) + self.shortcut(x)).relu()


class ResNetExpert(_PooledConvExpert):
    """A small residual CNN: a strided 3×3 stem, then stages of basic blocks at widths
    (w, 2w, 4w), each later stage halving the resolution; global pooling and a linear read-out.

    At the defaults (width 16, one block per stage) it costs ~3 M multiply-adds on a 32×32
    image, a few times the :class:`CNNExpert`. Dropout sits inside every block and before
    the read-out.
    """

    min_values = {"blocks": 1}  # each stage's block count

    def __init__(
        self,
        in_shape: Sequence[int],
        num_outputs: int,
        width: int = 16,
        blocks: Sequence[int] = (1, 1, 1),
        norm: str = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dropout = check_dropout(dropout)
        require(below_minimum(ResNetExpert, {"blocks": list(blocks)}))
        self.image_shape = image_shape(in_shape)
        layers: list[nn.Module] = [
            nn.Conv2d(self.image_shape[0], width, 3, stride=2, padding=1, bias=norm == "none"),
            _norm(norm, width),
            nn.ReLU(),
        ]
        channels = width
        for stage, count in enumerate(blocks):
            c_out = width * 2**stage
            for b in range(count):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(BasicBlock(channels, c_out, stride, norm, dropout))
                channels = c_out
        self.finish(layers, channels, num_outputs, dropout)
