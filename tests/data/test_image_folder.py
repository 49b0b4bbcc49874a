"""data=image_folder: a researcher's own images, through the CLI and with bad folders."""

import json

import pytest
from PIL import Image

from moe_exp.data.image_folder import ImageFolderDataModule
from moe_exp.errors import DataNotFoundError
from tests.conftest import QUICK, single_run_dir
from tests.data.disk_formats import write_image_folder


def test_a_folder_of_pngs_trains_through_the_cli(app, tmp_path):
    write_image_folder(tmp_path / "images", per_class=30)
    out = app(*QUICK, "data=image_folder", f"data.root={tmp_path / 'images'}", "threads=1")
    assert out.returncode == 0, out.stderr
    summary = json.loads((single_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["test/acc"] > 0.5  # 3 colour classes


def test_splits_are_cut_stratified_and_images_resized_and_normalised(tmp_path):
    write_image_folder(tmp_path, per_class=20)
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, test_fraction=0.25)
    dm.setup()
    assert dm.class_names == ["circle", "square", "stripes"] and dm.in_shape == (3, 16, 16)
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [
        41,
        4,
        15,
    ]  # val: round(0.1 · 45)
    assert dm.splits["test"].labels.bincount().tolist() == [5, 5, 5]
    train = dm.splits["train"].images
    assert abs(float(train.mean())) < 1e-4 and abs(float(train.std()) - 1) < 0.05


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no_train", "no train/ folder"),
        ("no_classes", "holds no class folders"),
        ("empty_class", "square is empty"),
        ("unreadable", "3.png could not be read as an image"),
        ("unknown_test_class", "class folders train/ lacks: triangle"),
        ("too_big", "over data.max_memory_mb=0.001"),
    ],
)
def test_bad_folders_fail_naming_the_file_or_folder(tmp_path, damage, message):
    root = tmp_path / "images"
    kwargs = {}
    if damage == "no_train":
        root.mkdir()
    elif damage == "no_classes":
        (root / "train").mkdir(parents=True)
    else:
        write_image_folder(root, per_class=6)
        if damage == "empty_class":
            for f in (root / "train" / "square").iterdir():
                f.unlink()
        elif damage == "unreadable":
            (root / "train" / "square" / "3.png").write_bytes(b"not a png")
        elif damage == "unknown_test_class":
            (root / "test" / "triangle").mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / "test" / "triangle" / "0.png")
        else:
            kwargs["max_memory_mb"] = 0.001
    with pytest.raises(DataNotFoundError, match=message):
        ImageFolderDataModule(str(root), **kwargs).setup()


def test_the_common_size_options_apply(tmp_path):
    write_image_folder(tmp_path, per_class=20)
    dm = ImageFolderDataModule(str(tmp_path), n_train=12)
    dm.setup()
    assert len(dm.splits["train"]) == 12
