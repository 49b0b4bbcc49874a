import torch

from moe_exp.data.transforms import BatchAugment, random_crop, random_flip


def test_flip_is_decided_per_image():
    x = torch.randn(200, 3, 8, 8)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert (flipped | kept).all()
    assert 60 < int(flipped.sum()) < 140


def test_crop_shifts_each_image_within_the_padding():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(100, 2, 1, 1) + 1
    out = random_crop(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.is_contiguous()
    shifts = set()
    for img, src in zip(out, x, strict=True):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                padded = torch.nn.functional.pad(src, (1, 1, 1, 1))
                if torch.equal(img, padded[:, 1 + dy : 5 + dy, 1 + dx : 5 + dx]):
                    shifts.add((dy, dx))
                    break
            else:
                continue
            break
        else:
            raise AssertionError("an output is not a shifted copy of its input")
    assert len(shifts) == 9  # every shift happens


def test_presets():
    assert not BatchAugment("none", 32, 0).active
    aug = BatchAugment("flip_crop", 32, 0)
    assert aug.flip and aug.crop and aug.padding == 4
    assert BatchAugment("crop", 8, 0).padding == 1
