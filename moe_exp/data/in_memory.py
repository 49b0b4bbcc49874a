"""A datamodule for datasets that fit in memory, served a whole batch per index.

Indexing one sample at a time and collating pays a per-sample cost at every step; here the
sampler yields lists of indices and the dataset slices tensors. Every dataset shares one
pipeline, so the common options (``conf/data/_common/defaults.yaml``) mean the same anywhere:

1. ``build_splits()`` (the subclass) gives "train", "test" and maybe "val"; uint8 scaled to [0, 1].
2. No "val": ``val_fraction`` of train is held out (seeded, class-stratified).
3. ``train_fraction`` then ``n_train`` shrink the training split, ``n_val`` / ``n_test`` cap
   the evaluation splits (seeded, class-stratified, exact counts).
4. ``label_noise`` flips exactly round(fraction · N_train) *training* labels to another class;
   the true label is kept as the latent ``clean_label`` (in every split).
5. Every split is standardised per channel with the training split's statistics.
6. ``hold_out`` removes inputs by a discrete latent's values (or by ``label``) from train and
   val, after the standardisation: a run trained without yellow images and a later run
   trained with them feed the same pixels to the experts, and the test split keeps every
   value, so accuracy on held-out and seen values can be compared (continual learning).
7. ``augment`` runs on whole training batches only (see :mod:`moe_exp.data.transforms`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from moe_exp.data.splits import flip_labels, stratified_take
from moe_exp.data.transforms import BatchAugment
from moe_exp.errors import ConfigError, check_ranges

log = logging.getLogger("moe_exp")

# Salts so each seeded step draws from its own stream (changing one option never reshuffles
# what another picked).
_VAL, _TRAIN, _CAP_VAL, _CAP_TEST, _NOISE, _AUGMENT = range(1, 7)


@dataclass
class Split:
    """One split: images [N, C, H, W] float, labels [N] long, latents [N, A] float."""

    images: Tensor
    labels: Tensor
    latents: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> Split:
        return Split(self.images[index], self.labels[index], self.latents[index])


class _BatchView(Dataset):
    def __init__(self, split: Split, transform=None) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.as_tensor(index)
        s = self.split
        images = s.images[idx]
        if self.transform is not None:
            images = self.transform(images)
        return images, s.labels[idx], s.latents[idx]


class InMemoryDataModule:
    """Subclasses implement :meth:`build_splits` and :attr:`class_names`; batches are
    (images, labels, latents). It has Lightning's datamodule hooks (``setup``,
    ``*_dataloader``) without being a Lightning class: the trainer gets it through
    :func:`moe_exp.training.adapters.lightning_data`.

    ``latent_names`` names the columns of ``latents`` (empty when the data has none);
    ``discrete_latents`` lists the categorical ones (shape, colour, cluster, clean_label) and
    ``latent_values`` names their values, for specialisation metrics and plots.
    """

    latent_names: tuple[str, ...] = ()
    discrete_latents: tuple[str, ...] = ()

    @classmethod
    def discrete_latents_for(cls, label_noise: float | None) -> tuple[str, ...]:
        """The discrete latents a datamodule of this class has (label noise keeps the true
        label as one more), known before any data is built."""
        return (*cls.discrete_latents, *(("clean_label",) if (label_noise or 0) > 0 else ()))

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        seed: int = 0,
        val_fraction: float = 0.1,
        train_fraction: float = 1.0,
        n_train: int | None = None,
        n_val: int | None = None,
        n_test: int | None = None,
        label_noise: float = 0.0,
        augment: str = "none",
        crop_padding: int | None = None,
        hold_out: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        check_ranges(
            "data",
            {
                "batch_size": batch_size,
                "eval_batch_size": eval_batch_size,
                "val_fraction": val_fraction,
                "train_fraction": train_fraction,
                "label_noise": label_noise,
                "n_train": n_train,
                "n_val": n_val,
                "n_test": n_test,
                "crop_padding": crop_padding,
            },
        )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.val_fraction = val_fraction
        self.train_fraction = train_fraction
        self.caps = {"train": n_train, "val": n_val, "test": n_test}
        self.label_noise = label_noise
        self.augment = augment
        self.crop_padding = crop_padding
        self.hold_out = _hold_out_spec(hold_out)
        BatchAugment(augment, 8, seed)  # check the preset name now, not at the first batch
        self.splits: dict[str, Split] = {}
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    # -- to implement -------------------------------------------------------------------
    def build_splits(self) -> dict[str, Split]:
        """ "train" and "test" (and "val" if the dataset defines one); images uint8 or float."""
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def latent_values(self) -> dict[str, list[str]]:
        """Value names of each discrete latent (subclasses extend)."""
        return {"clean_label": list(self.class_names)} if self.label_noise > 0 else {}

    # -- shared -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_shape(self) -> tuple[int, ...]:
        self.setup()
        return tuple(self.splits["train"].images.shape[1:])

    def latent_spec(self) -> dict[str, tuple[int, int]]:
        """Each discrete latent → (its column in ``latents``, its number of values)."""
        self.setup()
        values = self.latent_values
        return {
            name: (self.latent_names.index(name), len(values[name]))
            for name in self.discrete_latents
        }

    def _seed(self, salt: int) -> int:
        """A seed of its own for each use of randomness (split, noise, augmentation)."""
        return self.seed * 1_000_003 + salt

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self._seed(salt))

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        splits = self.build_splits()
        if "val" not in splits:
            train = splits["train"]
            n_val = round(self.val_fraction * len(train))
            val_idx, train_idx = stratified_take(train.labels, n_val, self._generator(_VAL))
            splits["val"], splits["train"] = train.subset(val_idx), train.subset(train_idx)
        splits["train"] = self._shrink(splits["train"], "train", self.train_fraction, _TRAIN)
        splits["val"] = self._shrink(splits["val"], "val", 1.0, _CAP_VAL)
        splits["test"] = self._shrink(splits["test"], "test", 1.0, _CAP_TEST)
        if self.label_noise > 0:
            splits = self._add_label_noise(splits)
        splits = self._normalize(splits)
        if self.hold_out:
            splits = self._drop_held_out(splits)
        self.splits = splits

    def _shrink(self, split: Split, name: str, fraction: float, salt: int) -> Split:
        n = len(split)
        keep = round(fraction * n)
        cap = self.caps[name]
        if cap is not None and cap > keep:
            log.debug("data.n_%s=%d exceeds the %d available; keeping all", name, cap, keep)
        keep = min(keep, cap) if cap is not None else keep
        if keep == n:
            return split
        if keep < 1:
            raise ConfigError(f"data.train_fraction={fraction} leaves no training samples")
        taken, _ = stratified_take(split.labels, keep, self._generator(salt))
        return split.subset(taken)

    def _add_label_noise(self, splits: dict[str, Split]) -> dict[str, Split]:
        """Flip training labels; every split gains the latent column ``clean_label``."""
        out = {}
        for name, s in splits.items():
            labels = s.labels
            if name == "train":
                g = self._generator(_NOISE)
                labels = flip_labels(s.labels, self.label_noise, self.num_classes, g)
            latents = torch.cat([s.latents, s.labels.float().unsqueeze(1)], dim=1)
            out[name] = Split(s.images, labels, latents)
        self.latent_names = (*self.latent_names, "clean_label")
        self.discrete_latents = self.discrete_latents_for(self.label_noise)
        return out

    def _drop_held_out(self, splits: dict[str, Split]) -> dict[str, Split]:
        """Train and val without the inputs whose latent (or label) takes a held-out value."""
        values = {"label": list(self.class_names), **self.latent_values}
        codes = {}  # latent → the held-out values' codes, checked once for both splits
        for latent, names in self.hold_out.items():
            if latent != "label" and latent not in self.discrete_latents:
                choices = ", ".join(["label", *self.discrete_latents])
                raise ConfigError(
                    f"data.hold_out names {latent!r}, which this data does not have; "
                    f"hold out by one of: {choices}"
                )
            unknown = [v for v in names if v not in values[latent]]
            if unknown:
                raise ConfigError(
                    f"data.hold_out.{latent}={list(names)}: {', '.join(map(repr, unknown))} "
                    f"not among its values ({', '.join(values[latent])})"
                )
            codes[latent] = torch.tensor([values[latent].index(v) for v in names])

        def held(split: Split) -> Tensor:
            out = torch.zeros(len(split), dtype=torch.bool)
            for latent, held_codes in codes.items():
                column = (
                    split.labels
                    if latent == "label"
                    else split.latents[:, self.latent_names.index(latent)].long()
                )
                out |= torch.isin(column, held_codes)
            return out

        out = dict(splits)
        for name in ("train", "val"):
            drop = held(splits[name])
            if name == "train" and bool(drop.all()):
                raise ConfigError(
                    f"data.hold_out={self.hold_out} holds out every training input; "
                    "keep at least one value"
                )
            out[name] = splits[name].subset(torch.nonzero(~drop).squeeze(1))
        return out

    def _normalize(self, splits: dict[str, Split]) -> dict[str, Split]:
        """Standardise every split per channel with the training split's statistics."""
        splits = {
            name: Split(_as_float(s.images), s.labels, s.latents) for name, s in splits.items()
        }
        train = splits["train"].images
        dims = [0, *range(2, train.dim())]
        mean = train.mean(dim=dims, keepdim=True)[0]
        std = train.std(dim=dims, keepdim=True)[0].clamp_min(1e-6)
        self.mean, self.std = mean, std
        for s in splits.values():
            s.images.sub_(mean).div_(std)  # in place: _as_float made fresh tensors
        return splits

    def _loader(self, name: str, batch_size: int, shuffle: bool) -> DataLoader:
        self.setup()
        transform = None
        if name == "train":
            image_size = self.splits["train"].images.shape[-1]
            augment = BatchAugment(
                self.augment, image_size, self._seed(_AUGMENT), self.crop_padding
            )
            transform = augment if augment.active else None
        view = _BatchView(self.splits[name], transform)
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


def _hold_out_spec(hold_out: Any) -> dict[str, list[str]]:
    """``{latent: [value names]}`` from the config, in plain types; checked for shape only
    (which latents and values exist is known once the data is built)."""
    if not hold_out:
        return {}
    if not isinstance(hold_out, Mapping):
        raise ConfigError(
            f"data.hold_out={hold_out!r} must map a latent to the values to hold out, "
            "e.g. data.hold_out={colour:[yellow]}"
        )
    spec = {}
    for latent, names in hold_out.items():
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, Sequence) or not all(isinstance(v, str) for v in names):
            raise ConfigError(
                f"data.hold_out.{latent}={names!r} must be a list of value names, "
                f"e.g. data.hold_out={{{latent}:[...]}}"
            )
        spec[str(latent)] = list(names)
    return spec


def _as_float(images: Tensor) -> Tensor:
    """A fresh float32 copy: uint8 scaled to [0, 1], float copied as is."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.to(torch.float32, copy=True)
