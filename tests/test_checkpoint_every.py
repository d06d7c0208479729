"""The checkpoint interval: fit writes (and reports) a checkpoint every `checkpoint_every`
epochs and after the last one; the default is every epoch."""
from __future__ import annotations

import pytest

from raycnn.config import TrainConfig
from raycnn.errors import ConfigError
from raycnn.trainer import fit
from raycnn import datafiles


def reported(tmp_path, **config) -> list:
    arrays = datafiles.synthetic("mnist", sizes=(64, 64))
    seen = []
    fit(TrainConfig(model="mnist_base", epochs=5, num_threads=1, **config),
        report=lambda metrics, ckpt: seen.append(ckpt is not None), checkpoint_dir=tmp_path / "ck", arrays=arrays)
    return seen


def test_every_epoch_by_default(tmp_path):
    assert reported(tmp_path) == [True] * 5


def test_every_second_epoch_and_the_last(tmp_path):
    assert reported(tmp_path, checkpoint_every=2) == [False, True, False, True, True]


def test_interval_must_be_positive():
    with pytest.raises(ConfigError, match="checkpoint_every must be positive, got 0"):
        TrainConfig(checkpoint_every=0).validate()
