"""The fast augmentation path gives the same pixels and consumes the same random draws as the
plain one: crop and flip on the uint8 batch, crop + flip as one gather."""
import pytest
import torch
from raycnn import augment, config


X = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
JITTER = {"brightness": (3.0, 10.0), "contrast": (3.0, 10.0), "saturation": (3.0, 10.0), "hue": (-0.5, 0.5)}


def test_crop_flip_in_one_gather_is_crop_then_flip():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for padding in (4, 10):
        fused = augment.random_crop_flip(X, padding, g1, 0.5)
        plain = augment.random_flip(augment.random_crop(X, padding, g2), g2, 0.5)
        assert torch.equal(fused, plain)
    assert torch.equal(g1.get_state(), g2.get_state())       # the same draws: exact resume unaffected


@pytest.mark.parametrize("kw", [dict(crop_padding=10, flip_p=0.5), dict(crop_padding=4), dict(flip_p=0.5),
                                dict(crop_padding=4, flip_p=0.5, jitter=JITTER)])
def test_pipeline_equals_augmenting_the_scaled_floats(kw):
    """The reference is the order the report's transforms imply: scale to [0, 1], crop, flip,
    jitter, normalize."""
    pipeline = augment.Pipeline("cifar10", torch.device("cpu"), size=32, **kw)
    g, order_g = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    rg, rorder_g = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in config.STATS["cifar10"])
    for _ in range(2):
        x = X.float() / 255
        if kw.get("crop_padding"):
            x = augment.random_crop(x, kw["crop_padding"], rg)
        if kw.get("flip_p"):
            x = augment.random_flip(x, rg, kw["flip_p"])
        if kw.get("jitter"):
            x = augment.color_jitter(x, kw["jitter"], rg, rorder_g)
        assert torch.equal(pipeline(X, train=True, g=g, order_g=order_g), (x - mean) / std)
    assert torch.equal(pipeline(X), (X.float() / 255 - mean) / std)
