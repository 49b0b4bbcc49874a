"""A LightningDataModule for datasets that fit in memory, served a whole batch per index.

Indexing one sample at a time and collating costs milliseconds per step on a small CPU
(see DESIGN.md); here the sampler yields lists of indices and the dataset slices tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler


@dataclass
class Split:
    """One split: images [N, C, H, W] float, labels [N] long, latents [N, A] float."""

    images: Tensor
    labels: Tensor
    latents: Tensor

    def __len__(self) -> int:
        return len(self.labels)


class _BatchView(Dataset):
    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.as_tensor(index)
        s = self.split
        return s.images[idx], s.labels[idx], s.latents[idx]


class InMemoryDataModule(L.LightningDataModule):
    """Subclasses implement :meth:`build_splits`; batches are (images, labels, latents).

    ``latent_names`` names the columns of ``latents`` (empty when the data has none);
    ``class_names`` names the labels.
    """

    latent_names: tuple[str, ...] = ()

    def __init__(self, batch_size: int = 128, eval_batch_size: int = 1024, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.splits: dict[str, Split] = {}

    # -- to implement -------------------------------------------------------------------
    def build_splits(self) -> dict[str, Split]:
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_shape(self) -> tuple[int, ...]:
        self.setup()
        return tuple(self.splits["train"].images.shape[1:])

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            splits = self.build_splits()
            self.splits = _normalize(splits)

    def _loader(self, name: str, batch_size: int, shuffle: bool) -> DataLoader:
        self.setup()
        view = _BatchView(self.splits[name])
        if shuffle:
            generator = torch.Generator().manual_seed(self.seed)
            sampler = RandomSampler(view, generator=generator)
        else:
            sampler = SequentialSampler(view)
        batches = BatchSampler(sampler, batch_size=batch_size, drop_last=False)
        return DataLoader(view, sampler=batches, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)


def _normalize(splits: dict[str, Split]) -> dict[str, Split]:
    """Standardise every split per channel with the training split's statistics."""
    train = splits["train"].images
    dims = [0, *range(2, train.dim())]
    mean = train.mean(dim=dims, keepdim=True)[0]
    std = train.std(dim=dims, keepdim=True)[0].clamp_min(1e-6)
    return {name: Split((s.images - mean) / std, s.labels, s.latents) for name, s in splits.items()}
