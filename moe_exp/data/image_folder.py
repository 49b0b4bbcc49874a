"""Your own images (``data=image_folder``), in torchvision's ImageFolder layout.

``data.root`` holds ``train/<class>/*`` and optionally ``val/<class>/*`` and
``test/<class>/*``; a missing test split is cut from train (class-stratified, seeded with
``split_seed``) and a missing val split too (``val_fraction``, as for every dataset). Any
file PIL reads is resized to ``image_size`` × ``image_size`` and loaded once into memory as
uint8, then normalised with the training split's statistics like the bundled sets; a folder
that would not fit in ``max_memory_mb`` is refused before a file is read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moe_exp.data.in_memory import InMemoryDataModule, Split
from moe_exp.data.splits import stratified_take
from moe_exp.errors import ConfigError, DataNotFoundError, check_ranges

SPLITS = ("train", "val", "test")
MODES = {1: "L", 3: "RGB"}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


class ImageFolderDataModule(InMemoryDataModule):
    """Images in ``root/{train,val,test}/<class>/``; the class folders of train name the
    classes (sorted), and val and test may hold only those."""

    def __init__(
        self,
        root: str = "",
        image_size: int = 32,
        channels: int = 3,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        max_memory_mb: float = 4096.0,
        **common,
    ) -> None:
        super().__init__(**common)
        check_ranges("data", {"image_size": image_size, "test_fraction": test_fraction})
        if channels not in MODES:
            raise ConfigError(f"data.channels={channels} must be 1 (grey) or 3 (RGB)")
        self.root = Path(root).expanduser()
        self.image_size, self.channels = image_size, channels
        self.test_fraction, self.split_seed = test_fraction, split_seed
        self.max_memory_mb = max_memory_mb
        self._classes: list[str] = []

    @property
    def class_names(self) -> list[str]:
        if not self._classes:
            self._classes = self._class_folders()
        return self._classes

    def _class_folders(self) -> list[str]:
        train = self.root / "train"
        if not train.is_dir():
            raise DataNotFoundError(
                f"data.root={self.root}: no train/ folder. data=image_folder reads "
                "<root>/train/<class>/<image> (and optionally val/ and test/ alike)"
            )
        classes = sorted(p.name for p in train.iterdir() if p.is_dir())
        if not classes:
            raise DataNotFoundError(
                f"{train} holds no class folders: put each class's images in {train}/<class name>/"
            )
        return classes

    def _listing(self, split: str) -> list[tuple[Path, int]]:
        folder = self.root / split
        found = sorted(p.name for p in folder.iterdir() if p.is_dir())
        unknown = sorted(set(found) - set(self.class_names))
        if unknown:
            raise DataNotFoundError(
                f"{folder} has class folders train/ lacks: {', '.join(unknown)} "
                f"(the classes are {', '.join(self.class_names)})"
            )
        listing = []
        for label, name in enumerate(self.class_names):
            files = _files(folder / name) if (folder / name).is_dir() else []
            if not files and split == "train":
                raise DataNotFoundError(f"{folder / name} is empty: every class needs images")
            listing += [(path, label) for path in files]
        return listing

    def _load(self, listing: list[tuple[Path, int]]) -> tuple[Tensor, Tensor]:
        from PIL import Image, UnidentifiedImageError

        images = np.empty((len(listing), self.image_size, self.image_size, self.channels), np.uint8)
        size = (self.image_size, self.image_size)
        for i, (path, _) in enumerate(listing):
            try:
                with Image.open(path) as image:
                    pixels = image.convert(MODES[self.channels]).resize(size, Image.BILINEAR)
            except (UnidentifiedImageError, OSError, ValueError) as err:
                raise DataNotFoundError(f"{path} could not be read as an image: {err}") from None
            images[i] = np.asarray(pixels).reshape(*size, self.channels)
        labels = torch.tensor([label for _, label in listing], dtype=torch.long)
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels

    def build_splits(self) -> dict[str, Split]:
        listings = {s: self._listing(s) for s in SPLITS if (self.root / s).is_dir()}
        if "train" not in listings:
            self._class_folders()  # raises, naming the layout
        count = sum(len(v) for v in listings.values())
        megabytes = count * self.channels * self.image_size**2 / 2**20
        if megabytes > self.max_memory_mb:
            raise DataNotFoundError(
                f"{self.root}: {count} images at {self.image_size}×{self.image_size} need "
                f"{megabytes:.0f} MB in memory, over data.max_memory_mb={self.max_memory_mb:g}: "
                "lower data.image_size or raise data.max_memory_mb"
            )
        splits = {}
        for name, listing in listings.items():
            images, labels = self._load(listing)
            splits[name] = Split(images, labels, torch.zeros(len(labels), 0))
        if "test" not in splits:
            train = splits["train"]
            n_test = round(self.test_fraction * len(train))
            g = torch.Generator().manual_seed(self.split_seed)
            test, rest = stratified_take(train.labels, n_test, g)
            splits["test"], splits["train"] = train.subset(test), train.subset(rest)
        return splits
