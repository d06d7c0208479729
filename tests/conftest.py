"""Shared fixtures: tiny datasets written in the real on-disk formats, training helpers, a private
RAY_TMPDIR, and one interrupted run that several tests resume."""
import gzip
import math
import pickle
import shutil
import signal
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from raycnn import trainer
from support import FAULT_SUITE, Background, cli_env, reported, wait_for


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """Write `array` (uint8) as an IDX file, the format of MNIST's published files."""
    header = struct.pack(">I", 0x00000800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if compress else open
    with opener(str(path) + (".gz" if compress else ""), "wb") as f:
        f.write(payload)


def make_mnist(root: Path, n_train: int = 64, n_test: int = 32, compress: bool = False, seed: int = 0) -> dict:
    g = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = g.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = g.integers(0, 10, n, dtype=np.uint8)
        write_idx(raw / f"{split}-images-idx3-ubyte", x, compress)
        write_idx(raw / f"{split}-labels-idx1-ubyte", y, compress)
        arrays[split] = (x, y)
    return arrays


def make_cifar(root: Path, n_per_batch: int = 20, seed: int = 0) -> dict:
    g = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = g.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in g.integers(0, 10, n_per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels,
                         b"filenames": [b"x.png"] * n_per_batch}, f, protocol=4)
        written[name] = (data, labels)
    return written


@pytest.fixture
def mnist_root(tmp_path):
    return tmp_path, make_mnist(tmp_path)


@pytest.fixture
def cifar_root(tmp_path):
    return tmp_path, make_cifar(tmp_path)


def timeless(history: list[dict]) -> list[dict]:
    """A training history as two runs must agree on it: without timings (they differ run to run),
    NaN as None (NaN != NaN, and metrics a run does not have, such as val_acc, are NaN)."""
    nan_free = lambda v: None if isinstance(v, float) and math.isnan(v) else v
    return [{k: nan_free(v) for k, v in m.items() if k not in ("seconds", "images_per_s", "peak_mem_mb")}
            for m in history]


class Interrupt(Exception):
    """Stands for a crash: raised from `report` after an epoch's checkpoint was written."""


def whole_and_resumed(config, arrays, tmp_path) -> tuple[dict, dict]:
    """(an uninterrupted fit, the same fit stopped after epoch 1 and resumed from its checkpoint),
    both with their last checkpoint's model weights under "weights"."""
    whole = trainer.fit(config, checkpoint_dir=tmp_path / "whole", arrays=arrays)

    def stop_after_first(metrics, _):
        if metrics["epoch"] == 1:
            raise Interrupt
    with pytest.raises(Interrupt):
        trainer.fit(config, report=stop_after_first, checkpoint_dir=tmp_path / "cut", arrays=arrays)
    resumed = trainer.fit(config, checkpoint=tmp_path / "cut", checkpoint_dir=tmp_path / "cut", arrays=arrays)
    for result, folder in ((whole, "whole"), (resumed, "cut")):
        result["weights"] = torch.load(tmp_path / folder / "state.pt", weights_only=False)["model"]
    return whole, resumed


def assert_same_training(whole: dict, resumed: dict) -> None:
    """A resumed fit ends exactly as the uninterrupted one: same history, same weights."""
    assert timeless(resumed["history"]) == timeless(whole["history"])
    assert all(torch.equal(whole["weights"][k], resumed["weights"][k]) for k in whole["weights"])


@pytest.fixture
def ray_tmp():
    """A short private folder under /tmp, for RAY_TMPDIR (Ray's socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def interrupted(tmp_path_factory):
    """A run of FAULT_SUITE on one CPU, SIGINTed once a trial has finished and another has
    checkpointed an epoch: (suite file, results dir, run name, its process result, a copy of
    its run folder made right after the interrupt)."""
    tmp = tmp_path_factory.mktemp("interrupted")
    suite = tmp / "ft.toml"
    suite.write_text(FAULT_SUITE)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    try:
        res = tmp / "results"
        run = Background("run", suite, "--synthetic", "--num-cpus", "1", "--max-concurrent", "1",
                         "--results-dir", res, "--name", "r", env=cli_env(ray_tmp), logs=tmp / "run1")
        try:
            def ready():
                trials = reported(ray_tmp).values()
                done = [t for t in trials if t and t[-1].get("finished")]
                going = [t for t in trials if t and not t[-1].get("finished")]
                return done and going
            wait_for("a finished trial and a checkpointed one", ready, timeout=900, proc=run)
            run.proc.send_signal(signal.SIGINT)
            rc, out, err = run.wait(timeout=300)
        finally:
            run.stop()
        copy = tmp / "copy" / "results"
        shutil.copytree(res, copy, ignore=shutil.ignore_patterns(".*.tmp"))
        parquet = {f: (res / "r" / f).read_bytes() for f in ("trials.parquet", "epochs.parquet")}
        yield suite, res, "r", (rc, out, err, parquet), copy
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)




# A one-cell suite for `raycnn search`: 4 epochs on 540 training images (60 held out for
# validation), 8 samples over lr and momentum under ASHA (grace 1, factor 3: rungs at epochs 1
# and 3), a re-run of the best config with 2 seeds.
SEARCH_SUITE = """
[suite]
name = "tiny"
cpus_per_trial = 1
table = "Tiny searches"

[defaults]
model = "mnist_base"
epochs = 4
optimizer = "sgd"
lr = 0.01
momentum = 0.9
eval_batch_size = 1000

[[trials]]
name = "sgd"
row = "SGD"
report = 90

[search]
samples = 8
grace = 1
reduction_factor = 3
val_fraction = 0.1
repeats = 2

[search.optimizer.sgd]
lr = { around = 10 }
momentum = { uniform = [0.0, 0.95] }
"""
# The epochs cap of the searched fixture: below what 8 samples train even if ASHA stopped all but
# the first at the first rung (4 + 7 x 1 = 11), so the cap must end the search.
SEARCH_BUDGET = 10


def search_files(root: Path) -> tuple[Path, Path]:
    """The tiny suite file and a data root with MNIST-format files (600 training, 100 test images)."""
    (root / "tiny.toml").write_text(SEARCH_SUITE)
    make_mnist(root / "data", n_train=600, n_test=100)
    return root / "tiny.toml", root / "data"


@pytest.fixture(scope="session")
def searched(tmp_path_factory):
    """`raycnn search` of the tiny cell run to the end, one sample at a time (so ASHA's decisions
    are reproducible): (its run folder, the process result)."""
    tmp = tmp_path_factory.mktemp("searched")
    suite, data = search_files(tmp)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    try:
        from support import raycnn
        done = raycnn("search", "tiny/*", "--suite", suite, "--data-dir", data, "--budget", SEARCH_BUDGET,
                      "--results-dir", tmp / "runs", "--name", "s", "--num-cpus", "2", "--max-concurrent", "1",
                      env=cli_env(ray_tmp), timeout=1500)
        assert done.returncode == 0, done.stderr[-3000:]
        yield tmp / "runs" / "s", done
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
