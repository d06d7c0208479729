"""Datasets held on the training device, and batched augmentation on that device.

A split is one uint8 tensor (N, C, H, W) plus int64 labels. Each epoch draws a permutation on
the device and every transform runs on whole batches with per-image random parameters, so the
hot path has no PIL, no DataLoader workers and no host round trip (the airbench approach).

Files are read in torchvision's layout under a data root: `MNIST/raw/*-ubyte[.gz]` and
`cifar-10-batches-py/{data_batch_1..5,test_batch}`. CIFAR batches are unpickled directly, with
their structure checked but no md5, so re-encoded copies load.
"""
from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Per-channel statistics of the training sets (the usual published values), for Normalize.
STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
SIZES = {"mnist": (60_000, 10_000), "cifar10": (50_000, 10_000)}
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class DataError(RuntimeError):
    """Data files are missing or malformed; the message is one line for the user."""


@dataclass
class Arrays:
    """A dataset as numpy arrays: images uint8 (N, C, H, W), labels int64 (N,)."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


# ---------------------------------------------------------------- reading files

def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (MNIST's format), plain or .gz."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.exists():
            opener = gzip.open if candidate.suffix == ".gz" else open
            with opener(candidate, "rb") as f:
                raw = f.read()
            break
    else:
        raise FileNotFoundError(path)
    head = np.frombuffer(raw[:4], ">u4")[0]
    if head != magic:
        raise DataError(f"{candidate}: not an IDX file (magic {head}, expected {magic})")
    ndim = magic & 0xFF
    dims = np.frombuffer(raw[4:4 + 4 * ndim], ">u4").astype(int)
    data = np.frombuffer(raw[4 + 4 * ndim:], np.uint8).copy()   # writable, for torch
    if data.size != int(np.prod(dims)):
        raise DataError(f"{candidate}: {data.size} bytes of data, header says {tuple(dims)}")
    return data.reshape(dims)


def read_mnist(root: Path) -> Arrays:
    """MNIST from ROOT/MNIST/raw (IDX files, decompressed or the published .gz)."""
    raw = Path(root) / "MNIST" / "raw"
    out = []
    for split in ("train", "test"):
        images, labels = MNIST_FILES[split]
        x = _read_idx(raw / images, 2051)[:, None]
        y = _read_idx(raw / labels, 2049).astype(np.int64)
        if len(x) != len(y):
            raise DataError(f"{raw}: {len(x)} {split} images but {len(y)} labels")
        out += [x, y]
    return Arrays(*out)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: not a CIFAR-10 python batch (needs 'data' and 'labels')")
    data = np.asarray(batch[b"data"], np.uint8)
    labels = np.asarray(batch[b"labels"], np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: data {data.shape} / labels {labels.shape}, expected (N, 3072) / (N,)")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(root: Path) -> Arrays:
    """CIFAR-10 from ROOT/cifar-10-batches-py (python pickles, no md5 check)."""
    folder = Path(root) / "cifar-10-batches-py"
    out = []
    for split in ("train", "test"):
        parts = [_read_cifar_batch(folder / name) for name in CIFAR_FILES[split]]
        out += [np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])]
    return Arrays(*out)


READERS = {"mnist": read_mnist, "cifar10": read_cifar10}
DOWNLOADERS = {"mnist": "MNIST", "cifar10": "CIFAR10"}
WHERE = {
    "mnist": "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    "cifar10": "cifar-10-batches-py/{data_batch_1..5,test_batch}",
}


def _download(name: str, root: Path) -> None:
    import torchvision.datasets as tvd   # only on this cold path
    getattr(tvd, DOWNLOADERS[name])(str(root), train=True, download=True)


def read(name: str, root: str | Path, download: bool = True) -> Arrays:
    """Read dataset `name` (mnist|cifar10) under `root`; if its files are missing, download
    them through torchvision when `download` and the network allow, else raise DataError."""
    if name not in READERS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(READERS)}")
    root = Path(root).expanduser()
    try:
        return READERS[name](root)
    except (FileNotFoundError, NotADirectoryError) as missing:
        if download:
            try:
                _download(name, root)
                return READERS[name](root)
            except Exception:
                pass
        raise DataError(f"{name} files not found ({missing.filename}) and could not be downloaded: "
                        f"put {WHERE[name]} under {root}") from None


def synthetic(name: str, seed: int = 0, sizes: tuple[int, int] | None = None) -> Arrays:
    """Random images with the dataset's shapes and sizes and a learnable signal: each class has
    a fixed random template and an image is its template plus as much uniform noise. Drawn as
    uint8 directly, so full-size CIFAR-10 takes well under a second."""
    g = np.random.default_rng(seed)
    shape = SHAPES[name]
    templates = g.integers(0, 128, (10, *shape), dtype=np.uint8)
    out = []
    for n in sizes or SIZES[name]:
        y = g.integers(0, 10, n)
        x = (np.frombuffer(g.bytes(n * int(np.prod(shape))), np.uint8) >> 1).reshape(n, *shape)
        x += templates[y]        # (>> 1 made a writable copy in [0, 127]; the sum stays below 255)
        out += [x, y.astype(np.int64)]
    return Arrays(*out)


def subset(arrays: Arrays, max_train_samples: int | None) -> Arrays:
    """The first `max_train_samples` training images (the test split stays whole)."""
    if not max_train_samples or max_train_samples >= len(arrays.train_y):
        return arrays
    n = max_train_samples
    return Arrays(arrays.train_x[:n], arrays.train_y[:n], arrays.test_x, arrays.test_y)


# ---------------------------------------------------------------- on the device

@dataclass
class DeviceData:
    """A dataset resident on one device."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @classmethod
    def from_arrays(cls, arrays: Arrays, device: torch.device) -> "DeviceData":
        """Copy numpy arrays to `device` once (uint8 images: a quarter of float32's memory)."""
        return cls(*(torch.as_tensor(a).to(device) for a in
                     (arrays.train_x, arrays.train_y, arrays.test_x, arrays.test_y)))


def random_crop(x: torch.Tensor, padding: int, g: torch.Generator) -> torch.Tensor:
    """RandomCrop(size=H, padding) per image: zero-pad, then crop at a random offset each."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=x.device, generator=g)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=x.device, generator=g)
    rows = (dy + torch.arange(h, device=x.device).view(1, h, 1)).expand(n, h, w)
    cols = (dx + torch.arange(w, device=x.device).view(1, 1, w)).expand(n, h, w)
    flat = rows * (w + 2 * padding) + cols                    # index into each padded plane
    planes = padded.flatten(2)                                # (n, c, (h+2p)*(w+2p))
    return planes.gather(2, flat.flatten(1)[:, None].expand(n, c, h * w)).view(n, c, h, w)


def random_flip(x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """RandomHorizontalFlip(p) per image."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=g) < p
    return torch.where(flip, x.flip(-1), x)


_PLANE_INDEX: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _plane_index(h: int, w: int, padding: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of an h x w window at offset (0, 0) of a padded plane, as is and mirrored."""
    key = (h, w, padding, str(device))
    if key not in _PLANE_INDEX:
        rows = torch.arange(h, device=device).view(h, 1) * (w + 2 * padding)
        cols = torch.arange(w, device=device)
        _PLANE_INDEX[key] = ((rows + cols).view(1, h * w), (rows + cols.flip(0)).view(1, h * w))
    return _PLANE_INDEX[key]


def random_crop_flip(x: torch.Tensor, padding: int, g: torch.Generator, p: float) -> torch.Tensor:
    """`random_flip(random_crop(x, padding, g), g, p)` in one gather: the same random draws in the
    same order, the same pixels, a fraction of the passes over the batch (a step of a small net
    on the CPU spends a third of its time in augmentation otherwise)."""
    n, c, h, w = x.shape
    planes = F.pad(x, (padding,) * 4).flatten(2)              # (n, c, (h+2p)*(w+2p))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device, generator=g)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device, generator=g)
    flip = torch.rand(n, 1, device=x.device, generator=g) < p
    straight, mirrored = _plane_index(h, w, padding, x.device)
    flat = torch.where(flip, mirrored, straight) + (dy * (w + 2 * padding) + dx)
    return planes.gather(2, flat[:, None].expand(n, c, h * w)).view(n, c, h, w)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)   # torchvision's weights


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_brightness with a factor per image (f: (N,))."""
    return (x * f.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_contrast per image: blend with the image's mean gray level."""
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_saturation per image: blend with the grayscale image."""
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * _grayscale(x)).clamp(0, 1)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue per image (f in [-0.5, 0.5]): rotate hue in HSV space."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    v = maxc
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta == 0, torch.zeros_like(h), h)
    h = ((h / 6.0) % 1.0 + f.view(-1, 1, 1)) % 1.0
    i = torch.floor(h * 6.0)
    frac = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * frac), v * (1 - s * (1 - frac))
    # The six sextants of the hue circle, as (r, g, b) choices.
    table = torch.stack([torch.stack(c) for c in
                         ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return table.gather(0, i[None, None].expand(1, 3, *i.shape)).squeeze(0).permute(1, 0, 2, 3).clamp(0, 1)


JITTER_OPS = {"brightness": adjust_brightness, "contrast": adjust_contrast,
              "saturation": adjust_saturation, "hue": adjust_hue}


def color_jitter(x: torch.Tensor, ranges: dict[str, tuple[float, float]], g: torch.Generator,
                 order_g: torch.Generator) -> torch.Tensor:
    """ColorJitter with per-image factors drawn uniformly from `ranges` (name -> (lo, hi)).

    torchvision also shuffles the order of the four ops per call; here the order is shuffled
    once per batch (a per-image order would cost four times the work), drawn from the CPU
    generator `order_g` so that choosing it never waits on the device.
    """
    n = x.shape[0]
    items = list(ranges.items())
    for k in torch.randperm(len(items), generator=order_g).tolist():
        name, (lo, hi) = items[k]
        f = lo + (hi - lo) * torch.rand(n, device=x.device, generator=g)
        x = JITTER_OPS[name](x, f)
    return x


class Pipeline:
    """uint8 batch -> float batch for the model: scale to [0, 1], augment (training only: crop,
    flip, jitter, in the report's order), resize where the model needs it, normalize with the
    dataset's statistics. Built once per trial, so its constants live on the device."""

    def __init__(self, dataset: str, device: torch.device, crop_padding: int = 0, flip_p: float = 0.0,
                 jitter: dict[str, tuple[float, float]] | None = None, size: int | None = None):
        mean, std = STATS[dataset]
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.crop_padding, self.flip_p, self.jitter, self.size = crop_padding, flip_p, jitter or {}, size

    def __call__(self, x_u8: torch.Tensor, train: bool = False, g: torch.Generator | None = None,
                 order_g: torch.Generator | None = None) -> torch.Tensor:
        # Crop and flip move pixels only, so they run on the uint8 batch (a quarter of the bytes)
        # and commute exactly with the scaling below.
        x = x_u8
        if train and self.crop_padding and self.flip_p:
            x = random_crop_flip(x, self.crop_padding, g, self.flip_p)
        elif train and self.crop_padding:
            x = random_crop(x, self.crop_padding, g)
        elif train and self.flip_p:
            x = random_flip(x, g, self.flip_p)
        x = x.float().div_(255)
        if train and self.jitter:
            x = color_jitter(x, self.jitter, g, order_g)
        if self.size and self.size != x.shape[-1]:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x.sub_(self.mean).div_(self.std)   # in place: x is this call's own tensor here
