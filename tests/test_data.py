import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from raycnn import augment, config, datafiles, errors
from conftest import make_mnist


def test_mnist_idx_plain_and_gz(tmp_path):
    for compress in (False, True):
        root = tmp_path / str(compress)
        written = make_mnist(root, compress=compress)
        arrays = datafiles.read("mnist", root, download=False)
        assert arrays.train_x.shape == (64, 1, 28, 28) and arrays.train_x.dtype == np.uint8
        assert np.array_equal(arrays.train_x[:, 0], written["train"][0])
        assert np.array_equal(arrays.test_y, written["t10k"][1].astype(np.int64))


def test_cifar_pickles(cifar_root):
    root, written = cifar_root
    arrays = datafiles.read("cifar10", root, download=False)
    assert arrays.train_x.shape == (100, 3, 32, 32) and arrays.test_x.shape == (20, 3, 32, 32)
    # Rows are stored CHW-flat: the first 1024 bytes are the red plane.
    assert np.array_equal(arrays.train_x[0, 0].ravel(), written["data_batch_1"][0][0, :1024])
    assert arrays.train_y[20] == written["data_batch_2"][1][0]


def test_missing_files_one_line(tmp_path):
    with pytest.raises(errors.DataError) as e:
        datafiles.read("cifar10", tmp_path, download=False)
    assert "cifar-10-batches-py" in str(e.value) and "\n" not in str(e.value)


def test_malformed_files(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / "MNIST/raw/train-images-idx3-ubyte").write_bytes(b"\0\0\0\0garbage")
    with pytest.raises(errors.DataError, match="not an IDX file"):
        datafiles.read("mnist", tmp_path, download=False)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    import pickle
    for name in datafiles.CIFAR_FILES["train"] + datafiles.CIFAR_FILES["test"]:
        (folder / name).write_bytes(pickle.dumps({b"something": 1}))
    with pytest.raises(errors.DataError, match="not a CIFAR-10 python batch"):
        datafiles.read("cifar10", tmp_path, download=False)


def test_synthetic_and_subset():
    arrays = datafiles.synthetic("cifar10", sizes=(100, 30))
    assert arrays.train_x.shape == (100, 3, 32, 32) and arrays.test_y.shape == (30,)
    small = datafiles.subset(arrays, 40)
    assert len(small.train_y) == 40 and len(small.test_y) == 30
    assert datafiles.synthetic("mnist").train_x.shape == (60_000, 1, 28, 28)


def _images(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g)


@pytest.mark.parametrize("op,factor,tv", [
    ("brightness", 3.7, TF.adjust_brightness), ("contrast", 5.0, TF.adjust_contrast),
    ("saturation", 0.3, TF.adjust_saturation), ("saturation", 7.5, TF.adjust_saturation),
    ("hue", 0.31, TF.adjust_hue), ("hue", -0.45, TF.adjust_hue),
])
def test_jitter_ops_match_torchvision(op, factor, tv):
    x = _images(4)
    ours = augment.FAST_OPS[op](x, torch.full((4,), factor))
    ref = torch.stack([tv(img, factor) for img in x])
    assert torch.allclose(ours, ref, atol=1e-5)


def test_jitter_is_per_image():
    x = _images(2)[:1].expand(8, -1, -1, -1).contiguous()       # eight copies of one image
    g, og = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    out = augment.color_jitter(x, {"brightness": (0.5, 1.5), "hue": (-0.5, 0.5)}, g, og)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert len({tuple(o.flatten()[:50].tolist()) for o in out}) == 8


def test_random_crop_matches_torchvision_crop():
    x = _images(8)
    g = torch.Generator().manual_seed(3)
    out = augment.random_crop(x, 10, g)
    assert out.shape == x.shape
    # Same offsets, drawn again from the same seed, through torchvision's functional ops.
    g = torch.Generator().manual_seed(3)
    dy = torch.randint(0, 21, (8, 1, 1), generator=g).flatten()
    dx = torch.randint(0, 21, (8, 1, 1), generator=g).flatten()
    for i in range(8):
        ref = TF.crop(TF.pad(x[i], [10]), int(dy[i]), int(dx[i]), 32, 32)
        assert torch.equal(out[i], ref)
    assert len({(int(a), int(b)) for a, b in zip(dy, dx)}) > 1      # offsets differ per image


def test_random_flip_per_image():
    x = _images(64)
    out = augment.random_flip(x, torch.Generator().manual_seed(0), 0.5)
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_pipeline_normalizes_and_resizes():
    x = (255 * _images(4)).to(torch.uint8)
    pipe = augment.Pipeline("cifar10", torch.device("cpu"), size=64)
    out = pipe(x)
    assert out.shape == (4, 3, 64, 64)
    ref = TF.normalize(TF.resize(x.float() / 255, [64, 64], antialias=False), *config.STATS["cifar10"])
    assert torch.allclose(out, ref, atol=1e-5)
    aug = augment.Pipeline("cifar10", torch.device("cpu"), crop_padding=4, flip_p=0.5,
                        jitter={"brightness": (3, 10), "contrast": (3, 10), "saturation": (3, 10), "hue": (-0.5, 0.5)})
    g, og = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    out = aug(x, train=True, g=g, order_g=og)
    assert out.shape == (4, 3, 32, 32) and torch.isfinite(out).all()
    assert torch.equal(aug(x), augment.Pipeline("cifar10", torch.device("cpu"))(x))   # eval: no augmentation


# ---------------------------------------------------------------- ColorJitter as PIL computes it

from PIL import Image                                   # noqa: E402
import torchvision.transforms as T                     # noqa: E402

TV_OPS = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
          "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}


def _u8_images(n=12, seed=0):
    """Random colour images, plus a gray one and a flat one (hue and saturation's edge cases)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    x[0] = x[0, :1]                       # gray: R = G = B
    x[1] = 77                             # one flat colour
    return x


def _pil(img_u8: torch.Tensor) -> Image.Image:
    return Image.fromarray(img_u8.permute(1, 2, 0).numpy())


def _from_pil(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("op,factor", [
    ("brightness", 0.4), ("brightness", 3.7), ("brightness", 9.9), ("contrast", 0.3), ("contrast", 5.2),
    ("saturation", 0.2), ("saturation", 7.5), ("hue", -0.5), ("hue", -0.13), ("hue", 0.31), ("hue", 0.5),
])
def test_faithful_ops_are_pils_byte_for_byte(op, factor):
    x = _u8_images()
    ours = augment.PIL_OPS[op](x.float(), torch.full((len(x),), factor))
    ref = torch.stack([_from_pil(TV_OPS[op](_pil(img), factor)) for img in x])
    assert torch.equal(ours.to(torch.uint8), ref)


class FixedJitter(T.ColorJitter):
    """torchvision's ColorJitter with the op order and factors given instead of drawn."""

    def __init__(self, order, factors):
        super().__init__(brightness=1.0, contrast=1.0, saturation=1.0, hue=0.5)
        self.fixed = (torch.as_tensor(order), *[float(f) for f in factors])

    def get_params(self, *_):
        return self.fixed


def test_faithful_jitter_is_colorjitter_on_pil_images():
    x = _u8_images(16, seed=1)
    ranges = {"brightness": (3.0, 10.0), "contrast": (3.0, 10.0), "saturation": (3.0, 10.0), "hue": (-0.5, 0.5)}
    out = augment.color_jitter_faithful(x.float() / 255, ranges, torch.Generator().manual_seed(5))
    # The same factors and per-image order, drawn again from the seed (ops in torchvision's
    # fn_idx order: brightness 0, contrast 1, saturation 2, hue 3), through ColorJitter.forward.
    g = torch.Generator().manual_seed(5)
    factors = torch.stack([lo + (hi - lo) * torch.rand(16, generator=g) for lo, hi in ranges.values()], 1)
    order = torch.rand(16, 4, generator=g).argsort(1)
    ref = torch.stack([_from_pil(FixedJitter(order[i], factors[i])(_pil(x[i]))) for i in range(16)])
    assert torch.equal((out * 255).round().to(torch.uint8), ref)
    assert len({tuple(o.tolist()) for o in order}) > 4                   # orders differ per image


def test_pipeline_jitter_modes():
    x = _u8_images(8)
    jitter = {"brightness": (3, 10), "contrast": (3, 10), "saturation": (3, 10), "hue": (-0.5, 0.5)}
    fast = augment.Pipeline("cifar10", torch.device("cpu"), jitter=jitter)
    faithful = augment.Pipeline("cifar10", torch.device("cpu"), jitter=jitter, jitter_mode="faithful")
    gens = lambda: (torch.Generator().manual_seed(0), torch.Generator().manual_seed(0))
    a, b = fast(x, True, *gens()), faithful(x, True, *gens())
    assert a.shape == b.shape and not torch.equal(a, b)
    mean, std = config.STATS["cifar10"]
    levels = b * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert torch.allclose(levels * 255, (levels * 255).round(), atol=1e-3)     # 8-bit values


@pytest.mark.parametrize("kind,dataset,mean,std", [
    ("dataset", "cifar10", *config.STATS["cifar10"]), ("dataset", "mnist", *config.STATS["mnist"]),
    ("half", "cifar10", (0.5,) * 3, (0.5,) * 3), ("half", "mnist", (0.5,), (0.5,)),
    ("imagenet", "cifar10", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])
def test_normalization_is_the_declared_one(kind, dataset, mean, std):
    c, h, w = config.SHAPES[dataset]
    x = torch.randint(0, 256, (2, c, h, w), dtype=torch.uint8)
    out = augment.Pipeline(dataset, torch.device("cpu"), normalize=kind)(x)
    assert torch.allclose(out, TF.normalize(x.float() / 255, mean, std), atol=1e-6)


def test_hold_out_is_a_fixed_split():
    a = datafiles.synthetic("mnist", seed=0, sizes=(100, 10))
    split = datafiles.hold_out(a, 0.2)
    assert (len(split.train_y), len(split.val_y), len(split.test_y)) == (80, 20, 10)
    assert np.array_equal(datafiles.hold_out(a, 0.2).val_x, split.val_x)        # the same every time
    assert datafiles.hold_out(a, 0.0) is a
