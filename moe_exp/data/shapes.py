"""Procedural shapes & colours: the seed's showcase for expert specialisation.

Each image is one filled shape of one colour on a noisy background, at a random position
and size. Generation is vectorised (masks from a coordinate grid, one pass per shape kind)
and deterministic from the seed; every sample keeps its latent attributes so metrics can ask
whether experts specialised by shape or by colour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_exp.data.in_memory import InMemoryDataModule, Split

# Shape masks on coordinates (u, v) scaled so the shape spans roughly [-1, 1]²; v points down.
SHAPE_MASKS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: torch.maximum(u.abs(), v.abs()) <= 0.8,
    "triangle": lambda u, v: (v <= 0.8) & (u.abs() <= (v + 1.0) * 0.55),
    "cross": lambda u, v: (
        ((u.abs() <= 0.3) & (v.abs() <= 1.0)) | ((v.abs() <= 0.3) & (u.abs() <= 1.0))
    ),
    "diamond": lambda u, v: u.abs() + v.abs() <= 1.0,
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.36),
}

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "magenta": (0.85, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.85),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.95, 0.95, 0.95),
}

LATENTS = ("shape", "colour", "size", "x", "y")
TARGETS = ("shape", "colour", "shape_colour")


@dataclass
class ShapesSample:
    """Generated images in [0, 1] and their latents (size and position in pixels)."""

    images: Tensor  # [N, 3, H, W] float32
    shape: Tensor  # [N] long
    colour: Tensor  # [N] long
    size: Tensor  # [N] float, half-extent in pixels
    x: Tensor  # [N] float, centre column
    y: Tensor  # [N] float, centre row

    def latents(self) -> Tensor:
        cols = [self.shape.float(), self.colour.float(), self.size, self.x, self.y]
        return torch.stack(cols, dim=1)


def generate_shapes(
    n: int,
    seed: int,
    image_size: int = 32,
    num_shapes: int = 4,
    num_colours: int = 4,
    noise: float = 0.1,
    colour_jitter: float = 0.05,
    size_range: tuple[float, float] = (0.3, 0.6),
) -> ShapesSample:
    """Draw n images; (shape, colour) pairs are exactly balanced up to n mod (S·C)."""
    if not 1 <= num_shapes <= len(SHAPE_MASKS):
        raise ValueError(f"num_shapes must be in [1, {len(SHAPE_MASKS)}], got {num_shapes}")
    if not 1 <= num_colours <= len(COLOURS):
        raise ValueError(f"num_colours must be in [1, {len(COLOURS)}], got {num_colours}")
    g = torch.Generator().manual_seed(seed)
    joint = torch.arange(n) % (num_shapes * num_colours)
    joint = joint[torch.randperm(n, generator=g)]
    shape, colour = joint // num_colours, joint % num_colours

    lo, hi = size_range
    size = (lo + (hi - lo) * torch.rand(n, generator=g)) * image_size / 2
    margin = size + 1.0
    x = margin + torch.rand(n, generator=g) * (image_size - 1 - 2 * margin)
    y = margin + torch.rand(n, generator=g) * (image_size - 1 - 2 * margin)

    grid = torch.arange(image_size, dtype=torch.float32)
    u = (grid.view(1, 1, -1) - x.view(-1, 1, 1)) / size.view(-1, 1, 1)
    v = (grid.view(1, -1, 1) - y.view(-1, 1, 1)) / size.view(-1, 1, 1)
    mask = torch.zeros(n, image_size, image_size, dtype=torch.bool)
    for s, draw in enumerate(list(SHAPE_MASKS.values())[:num_shapes]):
        rows = (shape == s).nonzero().squeeze(1)
        if rows.numel():
            mask[rows] = draw(u[rows], v[rows])

    palette = torch.tensor(list(COLOURS.values())[:num_colours])
    rgb = palette[colour] + colour_jitter * torch.randn(n, 3, generator=g)
    background = 0.2 + noise * torch.randn(n, 3, image_size, image_size, generator=g)
    foreground = rgb.view(n, 3, 1, 1) + noise * torch.randn(
        n, 3, image_size, image_size, generator=g
    )
    images = torch.where(mask.unsqueeze(1), foreground, background).clamp_(0.0, 1.0)
    return ShapesSample(images, shape, colour, size, x, y)


class ShapesDataModule(InMemoryDataModule):
    """Shapes & colours; ``target`` picks the label: shape, colour or shape_colour (joint)."""

    latent_names = LATENTS

    def __init__(
        self,
        target: str = "shape_colour",
        n_train: int = 12000,
        n_val: int = 2000,
        n_test: int = 2000,
        image_size: int = 32,
        num_shapes: int = 4,
        num_colours: int = 4,
        noise: float = 0.1,
        colour_jitter: float = 0.05,
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed)
        if target not in TARGETS:
            raise ValueError(f"data.target={target!r} is not one of {', '.join(TARGETS)}")
        self.target = target
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.options = dict(
            image_size=image_size,
            num_shapes=num_shapes,
            num_colours=num_colours,
            noise=noise,
            colour_jitter=colour_jitter,
        )
        self.shape_names = list(SHAPE_MASKS)[:num_shapes]
        self.colour_names = list(COLOURS)[:num_colours]

    @property
    def class_names(self) -> list[str]:
        if self.target == "shape":
            return self.shape_names
        if self.target == "colour":
            return self.colour_names
        return [f"{c} {s}" for s in self.shape_names for c in self.colour_names]

    def label(self, sample: ShapesSample) -> Tensor:
        if self.target == "shape":
            return sample.shape
        if self.target == "colour":
            return sample.colour
        return sample.shape * len(self.colour_names) + sample.colour

    def build_splits(self) -> dict[str, Split]:
        splits = {}
        for i, (name, n) in enumerate(self.sizes.items()):
            sample = generate_shapes(n, seed=self.seed * 1009 + i, **self.options)
            splits[name] = Split(sample.images, self.label(sample), sample.latents())
        return splits
