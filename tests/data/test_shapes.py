import pytest
import torch

from moe_exp.data.shapes import CLUSTER_TRANSFORMS, COLOURS, ShapesDataModule, generate_shapes
from moe_exp.errors import ConfigError

PALETTE = torch.tensor(list(COLOURS.values()))


def test_generation_is_deterministic_for_a_seed():
    kw = dict(clutter=2, clusters=["rotate90", "invert"])
    a, b = generate_shapes(64, seed=3, **kw), generate_shapes(64, seed=3, **kw)
    assert torch.equal(a.images, b.images) and torch.equal(a.shape, b.shape)
    assert torch.equal(a.cluster, b.cluster) and torch.equal(a.x, b.x)
    c = generate_shapes(64, seed=4, **kw)
    assert not torch.equal(a.images, c.images)


def test_generation_does_not_depend_on_the_chunk_size(monkeypatch):
    import moe_exp.data.shapes as shapes

    a = generate_shapes(100, seed=5, clutter=1, clusters=["flip"])
    monkeypatch.setattr(shapes, "CHUNK", 7)
    b = generate_shapes(100, seed=5, clutter=1, clusters=["flip"])
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)


def test_classes_are_balanced():
    s = generate_shapes(16 * 25, seed=0, num_shapes=4, num_colours=4)
    joint = s.shape * 4 + s.colour
    assert torch.bincount(joint, minlength=16).eq(25).all()


def test_clusters_are_balanced_within_every_class():
    kinds = ["rotate90", "invert", "channel_swap"]
    s = generate_shapes(16 * 30, seed=0, clusters=kinds, cluster_fraction=0.6)
    joint = s.shape * 4 + s.colour
    table = torch.zeros(16, 4, dtype=torch.long)
    table.index_put_((joint, s.cluster), torch.ones_like(joint), accumulate=True)
    # 30 per class: 12 plain, 18 = 6 per cluster
    assert table[:, 0].eq(12).all() and table[:, 1:].eq(6).all()


def _expected_centre_colour(cluster_kind: str | None, colour: torch.Tensor) -> torch.Tensor:
    rgb = PALETTE[colour]
    if cluster_kind == "invert":
        return 1.0 - rgb
    if cluster_kind == "channel_swap":
        return rgb[[1, 2, 0]]
    return rgb


@pytest.mark.parametrize("clutter", [0, 3])
def test_pixel_at_the_centre_has_the_shape_colour_in_every_cluster(clutter):
    kinds = list(CLUSTER_TRANSFORMS)
    s = generate_shapes(
        400, seed=1, noise=0.0, colour_jitter=0.0, clutter=clutter, clusters=kinds,
        cluster_fraction=0.8,
    )  # fmt: skip
    assert set(s.cluster.tolist()) == set(range(len(kinds) + 1))
    for i in range(len(s.images)):
        # the ring's centre is background; every other shape covers its centre
        if s.shape[i] == 5:
            continue
        kind = None if s.cluster[i] == 0 else kinds[int(s.cluster[i]) - 1]
        y, x = int(s.y[i].round()), int(s.x[i].round())
        expected = _expected_centre_colour(kind, s.colour[i])
        torch.testing.assert_close(s.images[i, :, y, x], expected)


def test_geometric_clusters_move_the_shape():
    plain = generate_shapes(200, seed=2, noise=0.0, colour_jitter=0.0, num_shapes=3)
    turned = generate_shapes(
        200, seed=2, noise=0.0, colour_jitter=0.0, num_shapes=3,
        clusters=["rotate90"], cluster_fraction=1.0,
    )  # fmt: skip
    assert turned.cluster.eq(1).all()
    torch.testing.assert_close(turned.images, torch.rot90(plain.images, 1, dims=(-2, -1)))
    torch.testing.assert_close(turned.x, plain.y)
    torch.testing.assert_close(turned.y, 31 - plain.x)


def test_clutter_adds_distractors_beneath_the_shape():
    clean = generate_shapes(300, seed=4, noise=0.0, colour_jitter=0.0)
    busy = generate_shapes(300, seed=4, noise=0.0, colour_jitter=0.0, clutter=4)
    background = (clean.images == 0.2).all(dim=1)
    changed = (busy.images != clean.images).any(dim=1)
    # distractors only ever replace background; shape pixels are untouched
    assert not (changed & ~background).any()
    assert changed.flatten(1).any(dim=1).float().mean() > 0.9
    torch.testing.assert_close(busy.shape, clean.shape)


def test_shapes_fit_inside_the_image():
    s = generate_shapes(500, seed=2, image_size=32)
    assert ((s.x - s.size) >= 0).all() and ((s.x + s.size) <= 31).all()
    assert ((s.y - s.size) >= 0).all() and ((s.y + s.size) <= 31).all()


def test_labels_follow_the_target_and_latents_match():
    for target, n_classes in (("shape", 3), ("colour", 5), ("shape_colour", 15)):
        dm = ShapesDataModule(
            target=target, n_train=150, n_val=30, n_test=30, num_shapes=3, num_colours=5,
            clusters=["invert"],
        )  # fmt: skip
        dm.setup()
        split = dm.splits["train"]
        shape, colour = split.latents[:, 0].long(), split.latents[:, 1].long()
        expected = {"shape": shape, "colour": colour, "shape_colour": shape * 5 + colour}[target]
        assert torch.equal(split.labels, expected)
        assert dm.num_classes == n_classes == len(dm.class_names)
        assert dm.latent_names == ("shape", "colour", "size", "x", "y", "cluster")
        assert dm.latent_spec() == {"shape": (0, 3), "colour": (1, 5), "cluster": (5, 2)}
        assert dm.latent_values["cluster"] == ["plain", "invert"]


def test_loaders_serve_whole_batches():
    dm = ShapesDataModule(n_train=300, n_val=50, n_test=50, batch_size=64)
    x, y, latents = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and y.shape == (64,) and latents.shape == (64, 6)
    assert x.dtype == torch.float32 and y.dtype == torch.long
    assert sum(len(b[1]) for b in dm.train_dataloader()) == 300
    # train statistics standardise the images
    train = dm.splits["train"].images
    torch.testing.assert_close(train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)


def test_other_image_sizes():
    dm = ShapesDataModule(n_train=64, n_val=16, n_test=16, image_size=48, clutter=2)
    assert dm.in_shape == (3, 48, 48)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "size"}, "data.target='size' is not one of shape, colour, shape_colour"),
        ({"clusters": ["spin"]}, "rotate90, flip, invert, channel_swap"),
        ({"num_shapes": 9}, "data.num_shapes=9"),
        ({"cluster_fraction": 1.5}, "data.cluster_fraction=1.5"),
    ],
)
def test_bad_options_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ShapesDataModule(**kwargs)


def test_a_second_datamodule_with_the_same_seed_reuses_the_rendered_images(monkeypatch):
    import moe_exp.data.shapes as shapes

    calls = []
    real = shapes.generate_shapes

    def counted(n, *args, **kwargs):
        calls.extend([n] if n else [])  # the constructor's option check draws 0 images
        return real(n, *args, **kwargs)

    monkeypatch.setattr(shapes, "generate_shapes", counted)
    monkeypatch.setattr(shapes, "_kept", type(shapes._kept)())
    options = dict(n_train=64, n_val=32, n_test=32, image_size=16, seed=5, label_noise=0.25)
    first = ShapesDataModule(**options)
    first.setup()  # normalises and flips labels: neither may reach the remembered sample
    second = ShapesDataModule(**options)
    second.setup()
    assert len(calls) == 3  # train, val, test rendered once
    for name in ("train", "val", "test"):
        assert torch.equal(first.splits[name].images, second.splits[name].images)
        assert torch.equal(first.splits[name].labels, second.splits[name].labels)
    ShapesDataModule(**{**options, "seed": 6}).setup()
    assert len(calls) == 6  # another seed is another draw
