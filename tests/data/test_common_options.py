"""The options every dataset shares (moe_exp/data/in_memory.py, moe_exp/data/splits.py)."""

import pytest
import torch

from moe_exp.data.bundled import DigitsDataModule
from moe_exp.data.shapes import ShapesDataModule
from moe_exp.data.splits import apportion, flip_labels, stratified_take
from moe_exp.data.torchvision_sets import FakeDataModule
from moe_exp.errors import ConfigError


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_apportion_is_exact_and_proportional():
    counts = torch.tensor([50, 30, 20])
    assert apportion(counts, 10).tolist() == [5, 3, 2]
    assert apportion(counts, 7).tolist() == [4, 2, 1]  # remainders .5 .1 .4: largest first
    assert int(apportion(torch.tensor([3, 3, 3]), 4).sum()) == 4
    assert apportion(counts, 100).tolist() == [50, 30, 20]


def test_stratified_take_is_exact_disjoint_and_seeded():
    labels = torch.arange(1000) % 7
    taken, rest = stratified_take(labels, 300, g())
    assert len(taken) == 300 and len(rest) == 700
    assert set(taken.tolist()).isdisjoint(rest.tolist())
    per_class = torch.bincount(labels[taken], minlength=7)
    assert per_class.min() >= 42 and per_class.max() <= 43
    assert torch.equal(taken, stratified_take(labels, 300, g())[0])
    assert not torch.equal(taken, stratified_take(labels, 300, g(1))[0])


def test_flip_labels_flips_exactly_the_fraction_to_other_classes():
    labels = torch.arange(1000) % 10
    noisy = flip_labels(labels, 0.2, 10, g())
    flipped = noisy != labels
    assert int(flipped.sum()) == 200
    assert noisy.min() >= 0 and noisy.max() <= 9
    # every class is a possible destination
    assert len(set(noisy[flipped].tolist())) == 10


def fake(**kw):
    kw = {"n_train": 100, "n_val": 20, "n_test": 20, "image_size": 8, **kw}
    dm = FakeDataModule(**kw)
    dm.setup()
    return dm


def digits(**kw):
    dm = DigitsDataModule(n_train=1000, **kw)
    dm.setup()
    return dm


def test_label_noise_touches_only_training_labels_and_keeps_the_truth():
    clean, noisy = digits(), digits(label_noise=0.2)
    train, truth = noisy.splits["train"], clean.splits["train"]
    assert noisy.latent_names == ("clean_label",) and noisy.discrete_latents == ("clean_label",)
    assert torch.equal(train.latents[:, 0].long(), truth.labels)
    flipped = train.labels != truth.labels
    assert int(flipped.sum()) == 200  # exactly 20 % of 1,000
    assert torch.equal(train.images, truth.images)
    for name in ("val", "test"):
        assert torch.equal(noisy.splits[name].labels, clean.splits[name].labels)
        assert torch.equal(noisy.splits[name].latents[:, 0].long(), clean.splits[name].labels)
    assert noisy.latent_spec() == {"clean_label": (0, 10)}
    # the batches carry the clean label as a latent column: over an epoch, 200 differ from y
    batches = list(noisy.train_dataloader())
    assert all(latents.shape == (len(y), 1) for _, y, latents in batches)
    assert sum(int((latents[:, 0].long() != y).sum()) for _, y, latents in batches) == 200


def test_label_noise_on_shapes_appends_a_column():
    dm = ShapesDataModule(n_train=320, n_val=32, n_test=32, label_noise=0.25)
    dm.setup()
    assert dm.latent_names[-1] == "clean_label" and len(dm.latent_names) == 7
    train = dm.splits["train"]
    assert int((train.labels != train.latents[:, -1].long()).sum()) == 80


def test_train_fraction_keeps_an_exact_stratified_subset():
    full = ShapesDataModule(n_train=1000, n_val=32, n_test=32)
    part = ShapesDataModule(n_train=1000, n_val=32, n_test=32, train_fraction=0.3)
    full.setup()
    part.setup()
    kept = part.splits["train"]
    assert len(kept) == 300
    per_class = torch.bincount(kept.labels, minlength=16)
    full_counts = torch.bincount(full.splits["train"].labels, minlength=16)
    assert (per_class - 0.3 * full_counts).abs().max() < 1
    # the kept samples are samples of the full set (latents identify them: size, x, y)
    rows = {tuple(r) for r in full.splits["train"].latents.tolist()}
    assert all(tuple(r) in rows for r in kept.latents.tolist())
    for name in ("val", "test"):
        assert torch.equal(part.splits[name].latents, full.splits[name].latents)


def test_val_split_and_n_train_on_a_dataset_without_val():
    dm = DigitsDataModule(val_fraction=0.1)
    dm.setup()
    n = {k: len(v) for k, v in dm.splits.items()}
    assert n == {"train": 1294, "val": 144, "test": 359}  # 1,797 = 359 test + 1,438
    small = DigitsDataModule(n_train=100, n_val=50, n_test=30)
    small.setup()
    assert len(small.splits["train"]) == 100 and len(small.splits["val"]) == 50
    assert torch.bincount(small.splits["train"].labels, minlength=10).eq(10).all()
    assert len(small.splits["test"]) == 30
    # caps above what exists keep everything
    big = DigitsDataModule(n_train=10_000)
    big.setup()
    assert len(big.splits["train"]) == 1294


def test_test_split_is_fixed_across_run_seeds_and_val_follows_the_seed():
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    a.setup()
    b.setup()
    test_a = a.splits["test"].images * a.std + a.mean
    test_b = b.splits["test"].images * b.std + b.mean
    torch.testing.assert_close(test_a, test_b)
    assert not torch.equal(a.splits["val"].labels, b.splits["val"].labels)


def test_augment_runs_on_training_batches_only():
    dm = fake(augment="flip_crop", n_train=64, batch_size=64)
    plain = fake(n_train=64, batch_size=64)  # the same seed: the same shuffled order
    x, y, _ = next(iter(dm.train_dataloader()))
    x_plain, y_plain = next(iter(plain.train_dataloader()))[:2]
    assert torch.equal(y, y_plain) and not torch.equal(x, x_plain)  # augmented, not reordered
    xv, _, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(xv, dm.splits["val"].images)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"label_noise": 1.0}, "data.label_noise=1.0 must be a number in [0, 1)"),
        ({"train_fraction": 0.0}, "data.train_fraction=0.0 must be a number in (0, 1]"),
        ({"val_fraction": 1.0}, "data.val_fraction=1.0 must be a number in (0, 1)"),
        ({"augment": "mixup"}, "data.augment='mixup' is not one of none, flip, crop, flip_crop"),
        ({"n_test": 0}, "data.n_test=0 must be an integer >= 1 or null"),
    ],
)
def test_bad_common_options_name_the_key(kwargs, message):
    with pytest.raises(ConfigError) as err:
        DigitsDataModule(**kwargs)
    assert message in str(err.value)


def test_hold_out_keeps_a_colour_out_of_train_and_val_but_not_test():
    kwargs = {"n_train": 800, "n_val": 200, "n_test": 200, "seed": 0}
    held = ShapesDataModule(hold_out={"colour": ["yellow"]}, **kwargs)
    whole = ShapesDataModule(**kwargs)
    held.setup(), whole.setup()
    column = held.latent_names.index("colour")
    seen = {s: set(held.splits[s].latents[:, column].long().tolist()) for s in held.splits}
    assert seen == {"train": {0, 1, 2}, "val": {0, 1, 2}, "test": {0, 1, 2, 3}}
    assert len(held.splits["train"]) == 600  # yellow is a quarter of the stratified draw
    # the same pixels as a run with every colour: standardised before the hold-out
    assert torch.equal(held.mean, whole.mean) and torch.equal(held.std, whole.std)
    assert torch.equal(held.splits["test"].images, whole.splits["test"].images)
    keep = whole.splits["train"].latents[:, column] != 3
    assert torch.equal(held.splits["train"].images, whole.splits["train"].images[keep])
    by_label = ShapesDataModule(hold_out={"label": ["red circle"]}, **kwargs)
    by_label.setup()
    assert 0 not in by_label.splits["train"].labels.tolist()


@pytest.mark.parametrize(
    ("hold_out", "message"),
    [
        ({"colour": ["purple"]}, "'purple' not among its values (red, green, blue, yellow)"),
        ({"size": ["big"]}, "names 'size', which this data does not have; hold out by one of: "
                            "label, shape, colour, cluster"),
        ({"colour": ["red", "green", "blue", "yellow"]}, "holds out every training input"),
        (["yellow"], "must map a latent to the values to hold out"),
        ({"colour": [1]}, "must be a list of value names"),
    ],
)  # fmt: skip
def test_a_bad_hold_out_names_the_value_and_the_choices(hold_out, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ShapesDataModule(n_train=80, n_val=20, n_test=20, hold_out=hold_out).setup()
