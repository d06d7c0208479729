"""Progress inside an epoch, as one small JSON file per running trial; Ray-free.

A ResNet-18 epoch on a CPU takes minutes, and Tune hears from a trial only once per epoch (each
report is a row of the results). So a trial also writes its batches done and its current
images/s to `RUN/progress/<trial folder>.json` every few seconds, and the live view reads those
files. The file is a side channel: nothing in it reaches the results, and it is removed when the
trial ends. On a cluster the run folder is in the bucket or on the shared filesystem every node
writes its checkpoints to, so the driver sees the files of every node's trials (in a bucket each
write is one small PUT: a trial makes one every `EVERY_S` seconds at most).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from raycnn import storage
from raycnn.errors import UserError
from raycnn.storage import Place

# Seconds between two writes; an epoch shorter than this never writes (tests shorten it).
EVERY_S = float(os.environ.get("RAYCNN_PROGRESS_S", "2"))


def folder(run_dir: str | Path | Place) -> Place:
    """Where a run's trials write their in-epoch progress."""
    return storage.resolve(run_dir) / "progress"


class ProgressFile:
    """`on_batch(epoch, step, steps)` for `raycnn.trainer.fit`: writes {epoch, step, steps,
    images_per_s, time} to `path` (atomically) at most every `every_s` seconds, and once more at
    an epoch's last step if it wrote during that epoch (then the trial is testing).

    It reads the clock only, never a tensor: on a GPU, where the host runs ahead of the device,
    `step` counts the batches queued, at most a launch queue's worth ahead of those computed,
    and no step waits for the device."""

    def __init__(self, path: str | Path | Place, batch_size: int, every_s: float = EVERY_S, clock=time.monotonic):
        self.path, self.batch_size, self.every_s, self.clock = storage.resolve(path), batch_size, every_s, clock
        self.epoch, self.since, self.wrote = None, (0.0, 0), False   # since: (time, step) of the last write or epoch start

    def __call__(self, epoch: int, step: int, steps: int) -> None:
        now = self.clock()
        if epoch != self.epoch:
            self.epoch, self.since, self.wrote = epoch, (now, 0), False
        seconds = now - self.since[0]
        if seconds < self.every_s and not (step == steps and self.wrote):
            return
        rate = (step - self.since[1]) * self.batch_size / seconds if seconds > 0 else float("nan")
        self.since, self.wrote = (now, step), True
        self._write({"epoch": epoch, "step": step, "steps": steps, "images_per_s": rate, "time": time.time()})

    def _write(self, record: dict) -> None:
        try:     # not durable: a lost progress file costs nothing, and it is rewritten in seconds
            self.path.write_text(json.dumps(record), durable=False)
        except UserError:    # progress is a courtesy: a full or read-only disk must not stop training
            pass

    def remove(self) -> None:
        """The trial ended (or starts afresh): no progress of it is current."""
        try:
            self.path.unlink()
        except OSError:    # as in _write: never a reason for a trial to fail
            pass


def read(path: str | Path | Place) -> dict | None:
    """A progress record, or None where there is none (or it is being replaced)."""
    try:
        return json.loads(storage.resolve(path).read_text())
    except (OSError, ValueError):
        return None
