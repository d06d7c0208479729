"""Nothing loaded from a run folder or a data file runs code: a checkpoint or a CIFAR batch
whose pickle would create a marker file is refused in one line, and the marker never appears."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from raycnn import checkpoint, datafiles, trainer
from raycnn.config import TrainConfig
from raycnn.errors import CheckpointError, DataError
from conftest import make_cifar


class Payload:
    """Unpickled, it creates the marker file: what a planted file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_checkpoint_holding_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "ck"
    folder.mkdir()
    torch.save({"model": Payload(marker), "progress": {"epoch": 1, "history": []}}, folder / checkpoint.STATE_FILE)
    for mmap in (False, True):
        with pytest.raises(CheckpointError) as err:
            checkpoint.read(folder, mmap=mmap)
        assert "refused" in str(err.value) and "\n" not in str(err.value)
        # The line says what was refused, not torch's advice to load the file unsafely.
        assert "os.makedirs" in str(err.value) and "weights_only" not in str(err.value)
    with pytest.raises(CheckpointError):
        checkpoint.check_all(tmp_path)
    # A trial handed it starts over and says so; the payload never ran.
    config = TrainConfig(model="mnist_base", epochs=1, synthetic=True, max_train_samples=128)
    reports = []
    with pytest.warns(UserWarning, match="unreadable"):
        trainer.fit(config, report=lambda m, _: reports.append(m), checkpoint=folder)
    assert "unreadable" in reports[0]["warning"] and not reports[0]["resumed"]
    assert not marker.exists()


def test_a_checkpoint_raycnn_wrote_reads_back(tmp_path):
    config = TrainConfig(model="mnist_base", epochs=1, synthetic=True, max_train_samples=128,
                         scheduler="multistep", milestones=(1,))
    trainer.fit(config, checkpoint_dir=tmp_path)
    assert checkpoint.check_all(tmp_path) == 2            # state.pt and best.pt
    state = checkpoint.read(tmp_path)
    assert state["progress"]["epoch"] == 1 and state["config"]["milestones"] == (1,)


def test_a_cifar_batch_holding_code_is_refused(tmp_path):
    make_cifar(tmp_path)
    marker = tmp_path / "marker"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": []}))
    with pytest.raises(DataError) as err:
        datafiles.read("cifar10", tmp_path, download=False)
    assert str(batch) in str(err.value) and "refused global" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
