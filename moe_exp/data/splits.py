"""Seeded, class-stratified index selection and label noise: pure tensor functions.

Every function takes an explicit ``torch.Generator`` so the same seed always picks the same
samples, and counts are exact (largest-remainder apportionment across classes).
"""

from __future__ import annotations

import torch
from torch import Tensor


def class_ranks(labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random order within each class: ``rank[i]`` is sample i's position among its class
    (0-based, uniformly shuffled); also returns the per-class counts."""
    n = len(labels)
    perm = torch.randperm(n, generator=generator)
    order = perm[torch.argsort(labels[perm], stable=True)]  # grouped by class, shuffled within
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if n else 0)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) - starts[labels[order]]
    return rank, counts


def apportion(counts: Tensor, total: int) -> Tensor:
    """Split ``total`` across classes in proportion to ``counts``, summing exactly to total
    (Hamilton's largest-remainder method; ties go to the lower class index)."""
    n = int(counts.sum())
    if not 0 <= total <= n:
        raise ValueError(f"cannot take {total} of {n} samples")
    if n == 0:
        return torch.zeros_like(counts)
    exact = counts.double() * total / n
    quota = exact.floor().long()
    left = total - int(quota.sum())
    if left:
        remainder = exact - quota
        # stable sort on -remainder: equal remainders keep class order
        quota[torch.argsort(-remainder, stable=True)[:left]] += 1
    return quota  # largest remainder never exceeds a class count


def stratified_take(labels: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Pick exactly ``n`` indices, each class in proportion to its size; returns
    (taken, rest), both sorted ascending."""
    rank, counts = class_ranks(labels, generator)
    quota = apportion(counts, n)
    taken = rank < quota[labels]
    return taken.nonzero().squeeze(1), (~taken).nonzero().squeeze(1)


def flip_labels(
    labels: Tensor, fraction: float, num_classes: int, generator: torch.Generator
) -> Tensor:
    """Symmetric label noise: exactly ``round(fraction · N)`` samples, chosen uniformly, get a
    label drawn uniformly from the *other* classes. Returns a new tensor."""
    n_flip = round(fraction * len(labels))
    noisy = labels.clone()
    if n_flip == 0 or num_classes < 2:
        return noisy
    chosen = torch.randperm(len(labels), generator=generator)[:n_flip]
    shift = torch.randint(1, num_classes, (n_flip,), generator=generator)
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    return noisy
