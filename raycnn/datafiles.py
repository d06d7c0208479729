"""Datasets read from files (or made up) as numpy arrays; torch-free.

Files are read in torchvision's layout under a data root: `MNIST/raw/*-ubyte[.gz]` (IDX) and
`cifar-10-batches-py/{data_batch_1..5,test_batch}` (Python pickles). A pickle can run code when
it is loaded, so CIFAR batches go through an unpickler that builds only what those files hold
(a dict of bytes, lists, ints and one uint8 numpy array) and refuses anything else; their
structure is checked, with no md5, so re-encoded copies load.
"""
from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raycnn.config import SHAPES, SIZES, TrainConfig
from raycnn.errors import DataError

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}



@dataclass
class Arrays:
    """A dataset as numpy arrays: images uint8 (N, C, H, W), labels int64 (N,); a validation
    split only where one was held out of the training set (see `hold_out`)."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    val_x: np.ndarray | None = None
    val_y: np.ndarray | None = None


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


class BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else: the only globals it resolves are those a
    pickled numpy array needs, so a file that tries to call anything else is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            batch = BatchUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise DataError(f"{path}: not a CIFAR-10 python batch ({e})") from None
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


def hold_out(arrays: Arrays, fraction: float) -> Arrays:
    """Move `fraction` of the training images into a validation split. The choice is one fixed
    random draw (seed 0), so every trial and every seed of a suite selects on the same images."""
    if not fraction:
        return arrays
    n = len(arrays.train_y)
    k = max(1, round(n * fraction))
    order = np.random.default_rng(0).permutation(n)
    val, train = np.sort(order[:k]), np.sort(order[k:])
    return Arrays(arrays.train_x[train], arrays.train_y[train], arrays.test_x, arrays.test_y,
                  arrays.train_x[val], arrays.train_y[val])


def without_test(arrays: Arrays) -> Arrays:
    """The arrays with no test split: what a search sample trains on, so that nothing it does
    can read the test images (selection is on the validation split)."""
    return Arrays(arrays.train_x, arrays.train_y, None, None, arrays.val_x, arrays.val_y)


def load(config: TrainConfig) -> Arrays:
    """A trial's dataset (synthetic, or read from its data_dir), cut to its max_train_samples."""
    name = config.dataset_name
    arrays = synthetic(name) if config.synthetic else read(name, config.data_dir)
    return subset(arrays, config.max_train_samples)
