"""torchvision's small image datasets, read from ``data.root`` and held in memory.

Each dataset is read once through its torchvision class (so the on-disk layout is exactly
torchvision's, and a folder downloaded by torchvision elsewhere works as is), then served as
whole-batch tensors by :class:`InMemoryDataModule`. Nothing is downloaded unless
``data.download=true``; missing files raise :class:`DataNotFoundError` naming the folder,
the files (from torchvision's own class attributes) and how to get them. ``fake`` wraps
torchvision's ``FakeData`` (random images and labels) for smoke tests of any image shape.

Layouts under ``root`` (torchvision's):
  MNIST/raw/, FashionMNIST/raw/   train-images-idx3-ubyte, ... (idx files, uncompressed)
  cifar-10-batches-py/            data_batch_1..5, test_batch, batches.meta (pickles)
  cifar-100-python/               train, test, meta (pickles)
  train_32x32.mat, test_32x32.mat (and extra_32x32.mat)   SVHN, directly in root
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moe_exp.data.in_memory import InMemoryDataModule, Split
from moe_exp.errors import ConfigError, DataNotFoundError


def _tv(name: str) -> Any:
    import torchvision.datasets

    return getattr(torchvision.datasets, name)


def _without_md5(cls: type) -> type:
    """``cls`` with its expected checksums removed (files must exist, contents unchecked)."""
    attrs: dict[str, Any] = {}
    if hasattr(cls, "train_list"):  # CIFAR-10/100
        attrs["train_list"] = [[f, None] for f, _ in cls.train_list]
        attrs["test_list"] = [[f, None] for f, _ in cls.test_list]
        attrs["meta"] = {**cls.meta, "md5": None}
    if hasattr(cls, "split_list"):  # SVHN
        attrs["split_list"] = {k: [url, f, None] for k, (url, f, _) in cls.split_list.items()}
    return type(cls.__name__, (cls,), attrs) if attrs else cls


class TorchvisionDataModule(InMemoryDataModule):
    """Base for the on-disk datasets. Subclasses set ``option`` (the ``data=`` name),
    ``tv_name`` (the torchvision class) and ``approx_size``, and implement :meth:`folder`,
    :meth:`files` and :meth:`read`.

    ``check_md5`` keeps torchvision's checksum test of the files where it has one
    (CIFAR, SVHN); MNIST-style idx files are only checked for presence.
    """

    option = ""
    tv_name = ""
    approx_size = ""

    def __init__(self, root: str, download: bool = False, check_md5: bool = True, **common) -> None:
        super().__init__(**common)
        self.root = Path(os.path.expanduser(str(root)))
        self.download = download
        self.check_md5 = check_md5
        self._class_names: list[str] = []

    # -- to implement -------------------------------------------------------------------
    def folder(self) -> Path:
        """Where the files live, relative to root."""
        raise NotImplementedError

    def files(self) -> list[str]:
        raise NotImplementedError

    def read(self, train: bool) -> tuple[Tensor, Tensor, list[str]]:
        """One official split: uint8 images [N, C, H, W], labels [N] long, class names."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        if not self._class_names:  # known once the files are read
            self.setup()
        return self._class_names

    def tv_class(self) -> type:
        cls = _tv(self.tv_name)
        return cls if self.check_md5 else _without_md5(cls)

    def missing(self) -> list[str]:
        where = self.root / self.folder()
        return [f for f in self.files() if not (where / f).is_file()]

    def _not_found(self, missing: list[str]) -> DataNotFoundError:
        where = self.root / self.folder()
        which = "" if missing == self.files() else "; missing " + ", ".join(missing)
        return DataNotFoundError(
            f"Dataset data={self.option} ({self.tv_name}) was not found: looked in {where} "
            f"for {', '.join(self.files())}{which}. The folder comes "
            f"from data.root={self.root} (default: $MOE_EXP_DATA, else ~/.cache/moe-exp/data). "
            f"To get the files (~{self.approx_size}), run once with data.download=true on a "
            f"machine with a network (torchvision fetches them into data.root in this layout), "
            f"or copy a torchvision download of {self.tv_name} there, or point data.root (or "
            f"MOE_EXP_DATA) at a folder that already holds them."
        )

    def _open(self, **kwargs: Any) -> Any:
        """The torchvision dataset object, with torchvision's errors turned into ours."""
        try:
            return self.tv_class()(root=str(self.root), download=self.download, **kwargs)
        except Exception as err:
            if self.download:
                raise DataNotFoundError(
                    f"Dataset data={self.option} ({self.tv_name}) could not be downloaded into "
                    f"{self.root} ({type(err).__name__}: {err}). This machine may have no "
                    f"network: download on one that has (data.download=true) and copy "
                    f"{self.root / self.folder()} here, or point data.root at a copy."
                ) from err
            if missing := self.missing():
                raise self._not_found(missing) from err
            # torchvision's own check fails with a RuntimeError ("not found or corrupted");
            # a truncated or damaged file fails in the reader (pickle, scipy, numpy, torch)
            checked = isinstance(err, RuntimeError)
            hint = ", or pass data.check_md5=false to read them anyway" if checked else ""
            problem = "fail torchvision's check" if checked else "cannot be read"
            raise DataNotFoundError(
                f"Dataset data={self.option} ({self.tv_name}): the files in "
                f"{self.root / self.folder()} are present but {problem} "
                f"({type(err).__name__}: {err}). They are corrupt, truncated or not the "
                f"originals: download them again (data.download=true, on a machine with a "
                f"network){hint}."
            ) from err

    def build_splits(self) -> dict[str, Split]:
        if not self.download and (missing := self.missing()):
            raise self._not_found(missing)
        splits = {}
        for name, train in (("train", True), ("test", False)):
            images, labels, self._class_names = self.read(train)
            splits[name] = Split(images, labels, torch.zeros(len(labels), 0))
        return splits


class MNISTDataModule(TorchvisionDataModule):
    """MNIST (60,000 train + 10,000 test 28×28 grey digits), from ``root/MNIST/raw``."""

    option, tv_name, approx_size = "mnist", "MNIST", "55 MB unpacked"

    def folder(self) -> Path:
        return Path(self.tv_name) / "raw"

    def files(self) -> list[str]:
        return [
            os.path.splitext(os.path.basename(url))[0] for url, _ in _tv(self.tv_name).resources
        ]

    def read(self, train: bool) -> tuple[Tensor, Tensor, list[str]]:
        ds = self._open(train=train)
        return ds.data.unsqueeze(1), ds.targets.long(), list(ds.classes)


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Xiao et al. 2017; MNIST's format), from ``root/FashionMNIST/raw``."""

    option, tv_name, approx_size = "fashion_mnist", "FashionMNIST", "55 MB unpacked"


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 (50,000 + 10,000 32×32 colour images), from ``root/cifar-10-batches-py``."""

    option, tv_name, approx_size = "cifar10", "CIFAR10", "170 MB"

    def folder(self) -> Path:
        return Path(_tv(self.tv_name).base_folder)

    def files(self) -> list[str]:
        cls = _tv(self.tv_name)
        return [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]

    def read(self, train: bool) -> tuple[Tensor, Tensor, list[str]]:
        ds = self._open(train=train)
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
        return images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long), ds.classes


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (100 fine classes), from ``root/cifar-100-python``."""

    option, tv_name, approx_size = "cifar100", "CIFAR100", "170 MB"


class SVHNDataModule(TorchvisionDataModule):
    """SVHN cropped digits (73,257 + 26,032 32×32 colour; ``extra`` adds 531,131 to train),
    from ``root/train_32x32.mat`` etc. Label 10 ("0") is mapped to 0 by torchvision."""

    option, tv_name, approx_size = "svhn", "SVHN", "240 MB, 1.3 GB with extra"

    def __init__(self, extra: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.extra = extra

    def folder(self) -> Path:
        return Path()

    def files(self) -> list[str]:
        split_list = _tv(self.tv_name).split_list
        return [split_list[s][1] for s in ("train", "test", *(("extra",) if self.extra else ()))]

    def read(self, train: bool) -> tuple[Tensor, Tensor, list[str]]:
        parts = ("train", "extra") if train and self.extra else ("train",) if train else ("test",)
        images, labels = [], []
        for split in parts:
            ds = self._open(split=split)
            images.append(torch.from_numpy(np.ascontiguousarray(ds.data)))
            labels.append(torch.as_tensor(ds.labels, dtype=torch.long))
        return torch.cat(images), torch.cat(labels), [str(d) for d in range(10)]


class FakeDataModule(InMemoryDataModule):
    """torchvision's ``FakeData``: random images and labels, deterministic from the seed.

    For smoke tests of any input: ``channels`` (1-4), ``image_size`` (square) and
    ``num_classes``. Nothing is learnable; accuracy stays at chance.
    """

    def __init__(
        self,
        n_train: int = 1000,
        n_val: int = 200,
        n_test: int = 200,
        channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        **common: Any,
    ) -> None:
        super().__init__(n_train=n_train, n_val=n_val, n_test=n_test, **common)
        if channels not in (1, 2, 3, 4):
            raise ConfigError(f"data.channels={channels} must be 1, 2, 3 or 4 (PIL image modes)")
        if image_size < 1 or num_classes < 2:
            raise ConfigError(
                f"data.image_size={image_size} must be >= 1 and "
                f"data.num_classes={num_classes} must be >= 2"
            )
        self.image_shape = (channels, image_size, image_size)
        self._num_classes = num_classes

    @property
    def class_names(self) -> list[str]:
        return [f"class {i}" for i in range(self._num_classes)]

    def build_splits(self) -> dict[str, Split]:
        from torchvision.datasets import FakeData
        from torchvision.transforms.v2.functional import pil_to_tensor

        splits = {}
        for i, (name, n) in enumerate(self.caps.items()):
            # FakeData seeds image j with j + random_offset: keep the splits' ranges apart
            offset = (self.seed * 3 + i) * 10_000_000
            ds = FakeData(n, self.image_shape, self._num_classes, random_offset=offset)
            items = [ds[j] for j in range(n)]
            images = torch.stack([pil_to_tensor(img) for img, _ in items])
            images = images.view(n, *self.image_shape)
            labels = torch.tensor([label for _, label in items], dtype=torch.long)
            splits[name] = Split(images, labels, torch.zeros(n, 0))
        return splits
