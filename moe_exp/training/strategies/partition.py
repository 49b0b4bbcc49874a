"""Partitions of the training data into one part per expert, for staged training."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from moe_exp.errors import ConfigError

PARTITIONS = ("kmeans", "random", "attribute")


def _hash_unit(x: Tensor, seed: int) -> Tensor:
    """A deterministic pseudo-random number in [0, 1) per image, from its pixels (the batches
    carry no dataset index, so a fixed 'random' partition is a hash of the content)."""
    g = torch.Generator().manual_seed(seed + 7919)
    w = torch.randn(x[0].numel(), generator=g).to(x.device, torch.float64)
    v = x.reshape(x.shape[0], -1).to(torch.float64) @ w * 1000.0
    return torch.frac(v.abs())


def attribute_problems(attribute: str | None, available: Iterable[str]) -> list[str]:
    """An attribute partition needs a discrete latent the data has."""
    names = list(available)
    if attribute in names:
        return []
    return [
        f"strategy.attribute={attribute!r} is not a discrete latent of this data; "
        f"available: {', '.join(names) or 'none'}"
    ]


class Partition:
    """Which part (= expert) each training input belongs to; there are exactly E parts.

    ``kmeans``: Lloyd's k-means (k-means++ seeding, ``iters`` iterations) on the training
    images' pixels, or on a fixed random projection to ``projection`` dims when > 0; an input
    goes to its nearest centroid. ``random``: a fixed pseudo-random, content-independent
    hash of the image (with ``data.augment`` on, an augmented copy may land in another
    part). ``attribute``: the discrete latent ``attribute`` (batch[2] column);
    with V values and E experts, V must be <= E: value v goes to experts v, v+V, v+2V, …
    (round-robin), and when V < E an input of value v is split among its experts by the hash.
    """

    def __init__(
        self,
        kind: str,
        num_experts: int,
        seed: int = 0,
        attribute: str | None = None,
        projection: int = 0,
        iters: int = 10,
    ) -> None:
        if kind not in PARTITIONS:
            raise ConfigError(f"strategy.partition={kind!r} is not one of {', '.join(PARTITIONS)}")
        self.kind, self.num_experts, self.seed = kind, num_experts, seed
        self.attribute, self.projection, self.iters = attribute, projection, iters
        self.centroids: Tensor | None = None
        self.proj: Tensor | None = None
        self.column = self.values = 0

    def fit(self, datamodule: Any, latents: Mapping[str, tuple[int, int]]) -> Partition:
        e = self.num_experts
        if self.kind == "attribute":
            if problems := attribute_problems(self.attribute, latents):
                raise ConfigError(problems[0])
            self.column, self.values = latents[self.attribute]
            if self.values > e:
                raise ConfigError(
                    f"strategy.partition=attribute: {self.attribute} has {self.values} values "
                    f"but experts={e}; the partition needs one part per expert (values <= "
                    f"experts; fewer values are spread round-robin). Set experts={self.values}."
                )
        elif self.kind == "kmeans":
            images = datamodule.splits["train"].images
            self.centroids = self._kmeans(self._features(images.float(), fit=True))
        return self

    def _features(self, x: Tensor, fit: bool = False) -> Tensor:
        flat = x.reshape(x.shape[0], -1).float()
        if self.projection <= 0:
            return flat
        if fit or self.proj is None:
            g = torch.Generator().manual_seed(self.seed + 104729)
            self.proj = torch.randn(flat.shape[1], self.projection, generator=g)
            self.proj /= flat.shape[1] ** 0.5
        return flat @ self.proj.to(flat.device)

    def _kmeans(self, feats: Tensor) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        n, e = feats.shape[0], self.num_experts
        if n < e:
            raise ConfigError(f"k-means partition: {n} training inputs < experts={e}")
        centroids = feats[torch.randint(n, (1,), generator=g)]
        for _ in range(1, e):  # k-means++ seeding
            d = torch.cdist(feats, centroids).min(1).values.pow(2)
            weights = d if float(d.sum()) > 0 else torch.ones_like(d)
            pick = torch.multinomial(weights, 1, generator=g)
            centroids = torch.cat([centroids, feats[pick]])
        for _ in range(self.iters):
            assign = torch.cdist(feats, centroids).argmin(1)
            for j in range(e):
                members = feats[assign == j]
                if len(members):
                    centroids[j] = members.mean(0)
        return centroids

    def __call__(self, x: Tensor, latents: Tensor) -> Tensor:
        """The part (expert id) of each input, long [N]."""
        e = self.num_experts
        if self.kind == "random":
            return (_hash_unit(x, self.seed) * e).long().clamp_max(e - 1)
        if self.kind == "kmeans":
            c = self.centroids.to(x.device)
            return torch.cdist(self._features(x), c).argmin(1)
        v = latents[:, self.column].long()
        if self.values == e:
            return v
        share = (e - v + self.values - 1) // self.values  # experts v, v+V, ... below e
        pick = (_hash_unit(x, self.seed) * share).long().clamp_max(share - 1)
        return v + self.values * pick
