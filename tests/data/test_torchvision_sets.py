"""torchvision datasets from files written in their real on-disk formats (no network)."""

import json

import pytest
import torch

from moe_exp.app.build import build_components
from moe_exp.data.torchvision_sets import FakeDataModule
from moe_exp.errors import DataNotFoundError
from tests.conftest import QUICK, compose_config, single_run_dir
from tests.data.disk_formats import ON_DISK, label_value, write

SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32),
          "cifar100": (3, 32, 32), "svhn": (3, 32, 32)}  # fmt: skip
CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}


@pytest.mark.parametrize("name", ON_DISK)
def test_each_dataset_loads_its_real_format_through_the_runner(name, tmp_path):
    n_train, n_test = write(name, tmp_path)
    cfg = compose_config(
        [*QUICK, f"data={name}", f"data.root={tmp_path}", "data.check_md5=false",
         "data.batch_size=16"]
    )  # fmt: skip
    datamodule, module = build_components(cfg)
    assert datamodule.in_shape == SHAPES[name]
    assert datamodule.num_classes == CLASSES[name] == len(datamodule.class_names)
    n = {k: len(v) for k, v in datamodule.splits.items()}
    assert n == {"train": n_train - round(0.1 * n_train), "val": round(0.1 * n_train),
                 "test": n_test}  # fmt: skip
    # images and labels stay paired: every pixel of a class-c image is in [v(c), v(c) + 7]
    for split in datamodule.splits.values():
        raw = (split.images * datamodule.std + datamodule.mean) * 255
        low = label_value(split.labels).float().view(-1, 1, 1, 1)
        assert ((raw - low) > -0.5).all() and ((raw - low) < 7.5).all()
    for x, y, latents in list(datamodule.train_dataloader())[:2]:
        assert x.shape[1:] == SHAPES[name] and x.dtype == torch.float32
        assert y.dtype == torch.long and latents.shape == (len(y), 0)
        log_probs, _ = module(x)
        assert log_probs.shape == (len(y), CLASSES[name])


def test_a_cli_run_on_files_on_disk_completes(app, tmp_path):
    write("cifar10", tmp_path / "data")
    out = app(*QUICK, "data=cifar10", f"data.root={tmp_path / 'data'}", "data.check_md5=false",
              "data.batch_size=16", "threads=1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads((single_run_dir(tmp_path) / "summary.json").read_text())
    assert data["status"] == "completed" and 0.0 <= data["test/acc"] <= 1.0


@pytest.mark.parametrize(
    ("name", "folder", "files"),
    [
        ("mnist", "MNIST/raw", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
        ("fashion_mnist", "FashionMNIST/raw", ["train-labels-idx1-ubyte"]),
        ("cifar10", "cifar-10-batches-py", ["data_batch_1", "test_batch", "batches.meta"]),
        ("cifar100", "cifar-100-python", ["train", "test", "meta"]),
        ("svhn", "", ["train_32x32.mat", "test_32x32.mat"]),
    ],
)
def test_missing_files_fail_with_where_and_how(name, folder, files, tmp_path):
    root = tmp_path / "empty"
    cfg = compose_config([*QUICK, f"data={name}", f"data.root={root}"])
    with pytest.raises(DataNotFoundError) as err:
        build_components(cfg)
    message = str(err.value)
    assert f"data={name}" in message
    assert str(root / folder) in message
    for f in files:
        assert f in message
    assert "data.download=true" in message and "network" in message
    assert "\n" not in message  # one paragraph


def test_some_files_missing_are_named(tmp_path):
    write("mnist", tmp_path)
    (tmp_path / "MNIST/raw/t10k-images-idx3-ubyte").unlink()
    cfg = compose_config([*QUICK, "data=mnist", f"data.root={tmp_path}"])
    with pytest.raises(DataNotFoundError, match="missing t10k-images-idx3-ubyte"):
        build_components(cfg)


def test_files_failing_the_checksum_say_so(tmp_path):
    write("svhn", tmp_path)
    cfg = compose_config([*QUICK, "data=svhn", f"data.root={tmp_path}"])
    with pytest.raises(DataNotFoundError) as err:
        build_components(cfg)
    assert "fail torchvision's check" in str(err.value) and "data.check_md5=false" in str(err.value)


def test_the_root_defaults_to_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_EXP_DATA", str(tmp_path))
    assert compose_config(["data=mnist"]).data.root == str(tmp_path)
    monkeypatch.delenv("MOE_EXP_DATA")
    monkeypatch.setenv("HOME", "/home/someone")
    assert compose_config(["data=mnist"]).data.root == "/home/someone/.cache/moe-exp/data"


@pytest.mark.parametrize(("channels", "size", "classes"), [(1, 8, 3), (3, 16, 10), (4, 12, 5)])
def test_fake_data_of_any_shape(channels, size, classes):
    dm = FakeDataModule(n_train=40, n_val=10, n_test=10, channels=channels, image_size=size,
                        num_classes=classes, batch_size=8)  # fmt: skip
    dm.setup()
    assert dm.in_shape == (channels, size, size) and dm.num_classes == classes
    x, y, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, channels, size, size) and y.max() < classes
    again = FakeDataModule(n_train=40, n_val=10, n_test=10, channels=channels, image_size=size,
                           num_classes=classes)  # fmt: skip
    again.setup()
    assert torch.equal(again.splits["train"].images, dm.splits["train"].images)
    assert not torch.equal(dm.splits["val"].images, dm.splits["test"].images)


@pytest.mark.parametrize("name", ON_DISK)
def test_a_truncated_file_is_named_not_a_traceback(name, tmp_path):
    """Files that exist but are cut short: the reader's error becomes one message naming
    the folder (the checksum is off, so the reader itself meets the damage)."""
    write(name, tmp_path)
    biggest = max((p for p in tmp_path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    cfg = compose_config([*QUICK, f"data={name}", f"data.root={tmp_path}", "data.check_md5=false"])
    with pytest.raises(DataNotFoundError, match="corrupt, truncated or not the originals") as err:
        build_components(cfg)
    assert str(biggest.parent) in str(err.value)
