"""Procedural shapes & colours: a dataset built to show expert specialisation.

Each image is one filled shape of one colour on a noisy background, at a random position and
size, optionally over distractors (``clutter``: small blobs and thin lines in random colours,
drawn beneath the shape). Every sample keeps its latent attributes so metrics can ask whether
experts specialised by shape, by colour, or by sub-population.

Sub-populations (``clusters``) follow Chen et al. (2022), "Towards understanding the
mixture-of-experts layer in deep learning": a union of clusters that each need their own
features, so a mixture can win by routing per cluster. A ``cluster_fraction`` of the images
(stratified over classes) is transformed by ``rotate90``, ``flip`` (upside down), ``invert``
(1 − colour) or ``channel_swap`` (RGB → GBR); the label keeps the *drawn* shape and colour,
the latent ``cluster`` says which transform (0 = plain). Generation is vectorised (parameters
drawn first, images rendered in chunks); the output depends only on the seed and the options.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moe_exp.data.in_memory import InMemoryDataModule, Split
from moe_exp.data.splits import class_ranks
from moe_exp.errors import ConfigError, check_ranges

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


def _rotate90(img: Tensor, x: Tensor, y: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    # torch.rot90 (counter-clockwise): new[r, c] = old[c, W-1-r], so (x, y) → (y, W-1-x)
    return torch.rot90(img, 1, dims=(-2, -1)), y, (size - 1) - x


CLUSTER_TRANSFORMS: dict[str, Callable[[Tensor, Tensor, Tensor, int], tuple[Tensor, ...]]] = {
    "rotate90": _rotate90,
    "flip": lambda img, x, y, size: (img.flip(-2), x, (size - 1) - y),
    "invert": lambda img, x, y, size: (1.0 - img, x, y),
    "channel_swap": lambda img, x, y, size: (img[:, [1, 2, 0]], x, y),
}

BACKGROUND = 0.2
LATENTS = ("shape", "colour", "size", "x", "y", "cluster")
TARGETS = ("shape", "colour", "shape_colour")
CHUNK = 4096  # images rendered at once: bounds the working memory, keeps it in cache


@dataclass
class ShapesSample:
    """Generated images in [0, 1] and their latents (size and position in pixels)."""

    images: Tensor  # [N, 3, H, W] float32
    shape: Tensor  # [N] long
    colour: Tensor  # [N] long
    size: Tensor  # [N] float, half-extent in pixels
    x: Tensor  # [N] float, centre column (after the cluster's transform)
    y: Tensor  # [N] float, centre row (after the cluster's transform)
    cluster: Tensor  # [N] long, 0 = plain, i = the i-th entry of ``clusters``

    def latents(self) -> Tensor:
        cols = [self.shape, self.colour, self.size, self.x, self.y, self.cluster]
        return torch.stack([c.float() for c in cols], dim=1)


def _check(name: str, value: float, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"data.{name}={value!r} is invalid: {allowed}")


def _distractor_pixels(d: dict[str, Tensor], rows: slice, image_size: int) -> tuple[Tensor, Tensor]:
    """Pixels covered by one distractor per image in ``rows``: a thin line segment or a small
    disc, rasterised as points (O(points) per image, not O(H·W)). Returns (image index within
    the chunk, flat pixel index) pairs."""
    x0, y0, x1, y1 = (d[k][rows].unsqueeze(1) for k in ("x0", "y0", "x1", "y1"))
    t = torch.linspace(0.0, 1.0, 2 * image_size)
    line_x, line_y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
    reach = int(torch.tensor(0.1 * image_size).ceil())
    off = torch.arange(-reach, reach + 1, dtype=torch.float32)
    oy, ox = torch.meshgrid(off, off, indexing="ij")
    oy, ox = oy.reshape(1, -1), ox.reshape(1, -1)
    in_disc = ox * ox + oy * oy <= d["radius"][rows].unsqueeze(1) ** 2
    blob_x, blob_y = x0 + ox, y0 + oy
    is_line = d["is_line"][rows].unsqueeze(1)
    px = torch.cat([line_x, blob_x], 1).round().long()
    py = torch.cat([line_y, blob_y], 1).round().long()
    keep = torch.cat([is_line.expand_as(line_x), ~is_line & in_disc], 1)
    keep &= (px >= 0) & (px < image_size) & (py >= 0) & (py < image_size)
    image, point = keep.nonzero(as_tuple=True)
    return image, py[image, point] * image_size + px[image, point]


def generate_shapes(
    n: int,
    seed: int,
    image_size: int = 32,
    num_shapes: int = 4,
    num_colours: int = 4,
    noise: float = 0.1,
    colour_jitter: float = 0.05,
    size_range: tuple[float, float] = (0.3, 0.6),
    clutter: int = 0,
    clusters: Sequence[str] = (),
    cluster_fraction: float = 0.5,
) -> ShapesSample:
    """Draw n images; (shape, colour) pairs are exactly balanced up to n mod (S·C), and within
    each pair ``cluster_fraction`` of the images are split evenly over ``clusters``."""
    _check("num_shapes", num_shapes, 1 <= num_shapes <= len(SHAPE_MASKS),
           f"must be in [1, {len(SHAPE_MASKS)}] ({', '.join(SHAPE_MASKS)})")  # fmt: skip
    _check("num_colours", num_colours, 1 <= num_colours <= len(COLOURS),
           f"must be in [1, {len(COLOURS)}] ({', '.join(COLOURS)})")  # fmt: skip
    _check("image_size", image_size, image_size >= 8, "must be >= 8")
    check_ranges(
        "data",
        {
            "noise": noise,
            "colour_jitter": colour_jitter,
            "clutter": clutter,
            "cluster_fraction": cluster_fraction,
        },
    )
    lo, hi = size_range
    _check(
        "size_min/size_max", (lo, hi), 0 < lo <= hi <= 0.9, "needs 0 < size_min <= size_max <= 0.9"
    )
    for kind in clusters:
        _check("clusters", list(clusters), kind in CLUSTER_TRANSFORMS,
               f"each must be one of {', '.join(CLUSTER_TRANSFORMS)}")  # fmt: skip

    g = torch.Generator().manual_seed(seed)
    joint = torch.arange(n) % (num_shapes * num_colours)
    joint = joint[torch.randperm(n, generator=g)]
    shape, colour = joint // num_colours, joint % num_colours

    size = (lo + (hi - lo) * torch.rand(n, generator=g)) * image_size / 2
    margin = size + 1.0
    span = (image_size - 1 - 2 * margin).clamp_min(0.0)  # centres keep the shape inside
    x = margin + torch.rand(n, generator=g) * span
    y = margin + torch.rand(n, generator=g) * span

    palette = torch.tensor(list(COLOURS.values()))[:num_colours]
    rgb = palette[colour] + colour_jitter * torch.randn(n, 3, generator=g)

    distractors = []
    for _ in range(clutter):
        ends = torch.rand(n, 4, generator=g) * (image_size - 1)
        distractors.append({
            "x0": ends[:, 0], "y0": ends[:, 1], "x1": ends[:, 2], "y1": ends[:, 3],
            "radius": (0.04 + 0.06 * torch.rand(n, generator=g)) * image_size,  # <= 0.1·size
            "is_line": torch.rand(n, generator=g) < 0.5,
            "rgb": torch.rand(n, 3, generator=g),
        })  # fmt: skip

    cluster = torch.zeros(n, dtype=torch.long)
    if clusters and n:
        rank, counts = class_ranks(joint, g)
        m = counts[joint]
        plain = m - torch.round(cluster_fraction * m).long()
        # round-robin over the clusters, starting at a different one per class
        turn = (rank - plain + joint) % len(clusters)
        cluster = torch.where(rank < plain, 0, 1 + turn)

    images = torch.empty(n, 3, image_size, image_size)
    grid = torch.arange(image_size, dtype=torch.float32)
    kinds = list(SHAPE_MASKS.values())[:num_shapes]
    buffer = torch.empty(min(n, CHUNK), 3, image_size, image_size)
    x_out, y_out = x.clone(), y.clone()  # centres after each cluster's transform
    for start in range(0, n, CHUNK):
        rows = slice(start, min(start + CHUNK, n))
        c = rows.stop - rows.start
        img = images[rows]  # a contiguous view: render in place
        img.fill_(BACKGROUND)
        pixels = img.view(c, 3, -1).permute(0, 2, 1)  # [c, H·W, 3], a view of img
        for d in distractors:
            image, pixel = _distractor_pixels(d, rows, image_size)
            pixels[image, pixel] = d["rgb"][rows][image]
        s = size[rows].view(-1, 1, 1)
        u = (grid.view(1, 1, -1) - x[rows].view(-1, 1, 1)) / s
        v = (grid.view(1, -1, 1) - y[rows].view(-1, 1, 1)) / s
        mask = torch.zeros(c, image_size, image_size, dtype=torch.bool)
        chunk_shape = shape[rows]
        for k, draw in enumerate(kinds):
            idx = (chunk_shape == k).nonzero().squeeze(1)
            if idx.numel():
                mask[idx] = draw(u[idx], v[idx])
        torch.where(mask.unsqueeze(1), rgb[rows].view(c, 3, 1, 1), img, out=img)
        if noise > 0:
            img.add_(torch.randn(img.shape, generator=g, out=buffer[:c]), alpha=noise)
        img.clamp_(0.0, 1.0)
        for i, kind in enumerate(clusters, start=1):
            idx = (cluster[rows] == i).nonzero().squeeze(1)
            if idx.numel():
                at = idx + start
                img[idx], x_out[at], y_out[at] = CLUSTER_TRANSFORMS[kind](
                    img[idx], x[at], y[at], image_size
                )

    return ShapesSample(images, shape, colour, size, x_out, y_out, cluster)


class ShapesDataModule(InMemoryDataModule):
    """Shapes & colours; ``target`` picks the label: shape, colour or shape_colour (joint).

    ``n_train`` / ``n_val`` / ``n_test`` are the numbers generated; the other common options
    (``train_fraction``, ``label_noise``, ``augment``, ...) act as for every dataset.
    """

    latent_names = LATENTS
    discrete_latents = ("shape", "colour", "cluster")

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
        size_min: float = 0.3,
        size_max: float = 0.6,
        clutter: int = 0,
        clusters: Sequence[str] = (),
        cluster_fraction: float = 0.5,
        **common,
    ) -> None:
        super().__init__(n_train=n_train, n_val=n_val, n_test=n_test, **common)
        if target not in TARGETS:
            raise ConfigError(f"data.target={target!r} is not one of {', '.join(TARGETS)}")
        self.target = target
        self.options = dict(
            image_size=image_size,
            num_shapes=num_shapes,
            num_colours=num_colours,
            noise=noise,
            colour_jitter=colour_jitter,
            size_range=(size_min, size_max),
            clutter=clutter,
            clusters=tuple(clusters),
            cluster_fraction=cluster_fraction,
        )
        generate_shapes(0, 0, **self.options)  # validate the options before any heavy work
        self.shape_names = list(SHAPE_MASKS)[:num_shapes]
        self.colour_names = list(COLOURS)[:num_colours]
        self.cluster_names = ["plain", *clusters]

    @property
    def class_names(self) -> list[str]:
        if self.target == "shape":
            return self.shape_names
        if self.target == "colour":
            return self.colour_names
        return [f"{c} {s}" for s in self.shape_names for c in self.colour_names]

    @property
    def latent_values(self) -> dict[str, list[str]]:
        own = {"shape": self.shape_names, "colour": self.colour_names}
        return {**own, "cluster": self.cluster_names, **super().latent_values}

    def label(self, sample: ShapesSample) -> Tensor:
        if self.target == "shape":
            return sample.shape
        if self.target == "colour":
            return sample.colour
        return sample.shape * len(self.colour_names) + sample.colour

    def build_splits(self) -> dict[str, Split]:
        splits = {}
        options = tuple(self.options.items())
        for i, (name, n) in enumerate(self.caps.items()):
            sample = _generated(n, self.seed * 1009 + i, options)
            splits[name] = Split(sample.images, self.label(sample), sample.latents())
        return splits


# rendered samples a process keeps, oldest dropped first beyond this many bytes of images
_KEEP_BYTES = 1 << 30
_kept: OrderedDict[tuple[Any, ...], ShapesSample] = OrderedDict()


def _generated(n: int, seed: int, options: tuple[tuple[str, Any], ...]) -> ShapesSample:
    """generate_shapes, remembered: the jobs of a sweep in one process (Hydra's own launcher,
    or one joblib worker) mostly share their data seeds, so each draw is rendered once. The
    sample is shared: setup copies the images (``_as_float``) before it changes them."""
    key = (n, seed, options)
    if key in _kept:
        _kept.move_to_end(key)
        return _kept[key]
    sample = generate_shapes(n, seed=seed, **dict(options))
    _kept[key] = sample
    while sum(s.images.nbytes for s in _kept.values()) > _KEEP_BYTES and len(_kept) > 1:
        _kept.popitem(last=False)
    return sample
