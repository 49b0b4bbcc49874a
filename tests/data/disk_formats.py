"""Write tiny datasets in torchvision's real on-disk formats (for tests; no network).

``write(name, root)`` creates the files ``data=<name>`` reads under ``root``: idx ubyte files
for MNIST and Fashion-MNIST, pickled batches + meta for CIFAR-10/100, MATLAB .mat files for
SVHN. Pixel values encode the label (every pixel of a class-c image lies in
[label_value(c), label_value(c) + 7]), so a loader that scrambles images and labels is
caught. ``write`` returns the (train, test) sizes written.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

ON_DISK = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn")
N_TRAIN, N_TEST = 60, 20


def label_value(label):
    """The darkest pixel value of an image of this class."""
    return (20 * label) % 248


def _images(labels: np.ndarray, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 8, size=(len(labels), *shape))
    base = label_value(labels.astype(np.int64)).reshape(-1, *[1] * len(shape))
    return (base + noise).astype(np.uint8)


def _labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % num_classes).astype(np.uint8)


def _idx(path: Path, array: np.ndarray) -> None:
    """The idx format: magic (0, 0, type 0x08 = ubyte, ndim), big-endian int32 dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str = "MNIST") -> tuple[int, int]:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", N_TRAIN, 0), ("t10k", N_TEST, 1)):
        labels = _labels(n, 10, seed)
        _idx(raw / f"{prefix}-images-idx3-ubyte", _images(labels, (28, 28), seed))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return N_TRAIN, N_TEST


def _cifar(root: Path, folder: str, num_classes: int) -> tuple[int, int]:
    base = root / folder
    base.mkdir(parents=True, exist_ok=True)
    hundred = num_classes == 100
    label_key = "fine_labels" if hundred else "labels"
    # CIFAR-10: five training batches; CIFAR-100: one file "train"
    train_files = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    per_file = N_TRAIN // len(train_files)
    files = [*((f, per_file) for f in train_files), ("test" if hundred else "test_batch", N_TEST)]
    for seed, (name, n) in enumerate(files):
        labels = _labels(n, num_classes, seed)
        entry = {
            "batch_label": name,
            label_key: labels.tolist(),
            # rows of 3072 bytes: the red plane, then green, then blue, each 32×32 row-major
            "data": _images(labels, (3, 32, 32), seed).reshape(n, 3072),
            "filenames": [f"img_{seed}_{i}.png" for i in range(n)],
        }
        if hundred:
            entry["coarse_labels"] = (labels // 5).tolist()
        with open(base / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    if hundred:
        meta_name, meta = (
            "meta",
            {
                "fine_label_names": [f"fine{i}" for i in range(100)],
                "coarse_label_names": [f"coarse{i}" for i in range(20)],
            },
        )
    else:
        meta_name, meta = (
            "batches.meta",
            {
                "label_names": [f"name{i}" for i in range(10)],
                "num_cases_per_batch": per_file,
                "num_vis": 3072,
            },
        )
    with open(base / meta_name, "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return per_file * len(train_files), N_TEST


def write_svhn(root: Path) -> tuple[int, int]:
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", N_TRAIN, 0), ("test", N_TEST, 1)):
        labels = _labels(n, 10, seed)
        images = _images(labels, (3, 32, 32), seed)  # [N, C, H, W]
        # SVHN's .mat: X is [H, W, C, N] uint8, y is [N, 1] with digit 0 stored as 10
        x = np.ascontiguousarray(images.transpose(2, 3, 1, 0))
        y = np.where(labels == 0, 10, labels).reshape(-1, 1).astype(np.uint8)
        savemat(root / f"{name}_32x32.mat", {"X": x, "y": y})
    return N_TRAIN, N_TEST


def write_image_folder(root: Path, classes=("circle", "square", "stripes"), per_class=12):
    """PNGs of three visibly different classes, in ImageFolder's train/<class>/ layout, of
    mixed sizes and modes (PIL resizes and converts them)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        folder = Path(root) / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = 20 + 4 * (i % 3)
            pixels = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
            pixels[..., label] += 200  # each class its own dominant colour
            mode_image = Image.fromarray(pixels)
            if i % 4 == 0:
                mode_image = mode_image.convert("L")
            mode_image.save(folder / f"{i}.png")
    return len(classes) * per_class, 0


def write(name: str, root: Path) -> tuple[int, int]:
    root = Path(root)
    if name == "image_folder":
        return write_image_folder(root)
    if name == "mnist":
        return write_mnist(root, "MNIST")
    if name == "fashion_mnist":
        return write_mnist(root, "FashionMNIST")
    if name == "cifar10":
        return _cifar(root, "cifar-10-batches-py", 10)
    if name == "cifar100":
        return _cifar(root, "cifar-100-python", 100)
    if name == "svhn":
        return write_svhn(root)
    raise ValueError(name)
