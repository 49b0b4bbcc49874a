import torch

from moe_exp.data.shapes import COLOURS, ShapesDataModule, generate_shapes


def test_generation_is_deterministic_for_a_seed():
    a, b = generate_shapes(64, seed=3), generate_shapes(64, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.shape, b.shape)
    c = generate_shapes(64, seed=4)
    assert not torch.equal(a.images, c.images)


def test_classes_are_balanced():
    s = generate_shapes(16 * 25, seed=0, num_shapes=4, num_colours=4)
    joint = s.shape * 4 + s.colour
    assert torch.bincount(joint, minlength=16).eq(25).all()


def test_pixel_at_the_centre_has_the_shape_colour():
    s = generate_shapes(200, seed=1, noise=0.0, colour_jitter=0.0)
    palette = torch.tensor(list(COLOURS.values()))
    for i in range(200):
        # the ring's centre is background; every other shape covers its centre
        if s.shape[i] == 5:
            continue
        y, x = int(s.y[i].round()), int(s.x[i].round())
        torch.testing.assert_close(s.images[i, :, y, x], palette[s.colour[i]])


def test_shapes_fit_inside_the_image():
    s = generate_shapes(500, seed=2, image_size=32)
    assert ((s.x - s.size) >= 0).all() and ((s.x + s.size) <= 31).all()
    assert ((s.y - s.size) >= 0).all() and ((s.y + s.size) <= 31).all()


def test_labels_follow_the_target_and_latents_match():
    for target, n_classes in (("shape", 3), ("colour", 5), ("shape_colour", 15)):
        dm = ShapesDataModule(
            target=target, n_train=150, n_val=30, n_test=30, num_shapes=3, num_colours=5
        )
        dm.setup()
        split = dm.splits["train"]
        shape, colour = split.latents[:, 0].long(), split.latents[:, 1].long()
        expected = {"shape": shape, "colour": colour, "shape_colour": shape * 5 + colour}[target]
        assert torch.equal(split.labels, expected)
        assert dm.num_classes == n_classes == len(dm.class_names)
        assert dm.latent_names[:2] == ("shape", "colour")


def test_loaders_serve_whole_batches():
    dm = ShapesDataModule(n_train=300, n_val=50, n_test=50, batch_size=64)
    x, y, latents = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and y.shape == (64,) and latents.shape == (64, 5)
    assert sum(len(b[1]) for b in dm.train_dataloader()) == 300
    # train statistics standardise the images
    train = dm.splits["train"].images
    torch.testing.assert_close(train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
