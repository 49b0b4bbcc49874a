import torch

from moe_exp.data.bundled import DigitsDataModule, MNIST5kDataModule


def test_digits_load_with_the_right_shapes_and_classes():
    dm = DigitsDataModule()
    dm.setup()
    assert dm.in_shape == (1, 8, 8) and dm.num_classes == 10
    assert dm.class_names == [str(d) for d in range(10)]
    assert sum(len(s) for s in dm.splits.values()) == 1797
    assert len(dm.splits["test"]) == round(0.2 * 1797)
    assert dm.latent_names == () and dm.splits["train"].latents.shape == (1294, 0)
    for split in dm.splits.values():
        assert set(split.labels.tolist()) == set(range(10))
    x, y, latents = next(iter(dm.train_dataloader()))
    assert x.shape == (dm.batch_size, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.long and latents.shape == (dm.batch_size, 0)


def test_mnist_5k_loads_with_the_right_shapes_and_classes():
    dm = MNIST5kDataModule()
    dm.setup()
    assert dm.in_shape == (1, 28, 28) and dm.num_classes == 10
    n = {k: len(v) for k, v in dm.splits.items()}
    assert n == {"train": 3600, "val": 400, "test": 1000}
    for split in dm.splits.values():  # 500 per class, split class-stratified
        counts = torch.bincount(split.labels, minlength=10)
        assert counts.eq(len(split) // 10).all()
    # pixels were 0..255 and are standardised with the training statistics
    assert dm.mean.item() * 255 > 20 and abs(dm.splits["train"].images.mean().item()) < 1e-4
