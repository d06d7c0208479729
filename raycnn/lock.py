"""One driver per run folder: RUN_DIR/driver.lock names the host and pid of the driver.

A second driver refuses to start (LockedError) and changes nothing. A lock left behind by a
process that no longer exists on this host is taken over; one from another host cannot be
checked from here, so the message says which file to remove if that driver is gone."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from raycnn.errors import LockedError

LOCK_FILE = "driver.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's process: alive
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None              # gone, or being written: try again


class RunLock:
    """`with RunLock(run_dir):` holds the run folder for this process."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}

    def acquire(self) -> None:
        """Take the lock, or raise LockedError naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _holder(self.path)
                if holder is None:
                    continue
                if holder.get("host") == self.me["host"] and not _alive(int(holder.get("pid", 0))):
                    self._take_over(holder)
                    return
                raise LockedError(f"run {self.path.parent} is driven by pid {holder.get('pid')} on "
                                  f"{holder.get('host')} (lock {self.path}; remove it only if that driver is gone)")
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            return
        raise LockedError(f"cannot take the lock {self.path}")

    def _take_over(self, stale: dict) -> None:
        """Replace a dead process's lock atomically; re-read so that of two drivers taking over
        at once only the one whose write landed last goes on."""
        tmp = self.path.with_name(f".{LOCK_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.me))
        os.replace(tmp, self.path)
        if _holder(self.path) != self.me:
            raise LockedError(f"run {self.path.parent} was taken over by another driver at the same time")

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if _holder(self.path) == self.me:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
