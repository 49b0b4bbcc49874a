"""Training-time augmentation on whole batches, with per-sample randomness.

torchvision's ``transforms.v2`` draws one set of random parameters per call, so applied to a
batch tensor it flips or crops every image the same way; calling it per image costs the
per-sample overhead that whole-batch indexing avoids. These few ops are vectorised instead:
each image gets its own coin flip and crop offset, from a seeded generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_exp.errors import ConfigError

AUGMENTS = ("none", "flip", "crop", "flip_crop")


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by ``padding`` and crop back to H×W at a random offset per image (a shift of
    up to ±padding pixels; zero is the mean pixel once the data are standardised)."""
    if padding <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (oy.view(-1, 1) + torch.arange(h)).view(b, h, 1)
    cols = (ox.view(-1, 1) + torch.arange(w)).view(b, 1, w)
    batch = torch.arange(b).view(b, 1, 1)
    # advanced indexing on (batch, row, col) of [B, H, W, C] → [B, h, w, C]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]
    return out.permute(0, 3, 1, 2).contiguous()


class BatchAugment:
    """The ``augment`` preset as a callable on [B, C, H, W] batches.

    Presets: ``none``; ``flip`` (horizontal, p = 1/2); ``crop`` (pad-and-crop shift);
    ``flip_crop`` (both). ``crop_padding`` defaults to max(1, H // 8): 4 px at 32×32,
    1 px at 8×8.
    """

    def __init__(self, preset: str, image_size: int, seed: int, crop_padding: int | None = None):
        if preset not in AUGMENTS:
            raise ConfigError(f"data.augment={preset!r} is not one of {', '.join(AUGMENTS)}")
        self.flip = "flip" in preset
        self.crop = "crop" in preset
        self.padding = max(1, image_size // 8) if crop_padding is None else crop_padding
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def active(self) -> bool:
        return self.flip or self.crop

    def __call__(self, x: Tensor) -> Tensor:
        if self.flip:
            x = random_flip(x, self.generator)
        if self.crop:
            x = random_crop(x, self.padding, self.generator)
        return x
