"""One driver per run folder: the driver holds an OS lock on RUN_DIR/driver.lock for its whole life.

Why flock: the kernel ties the lock to the driver's open file and drops it when the process ends,
however it ends (exit, exception, SIGKILL, the OOM killer), so a dead driver's lock is free at
once and there is no "is the holder still alive?" check that two drivers could both pass. The
file's text, the holder's host and pid written once the lock is held, only feeds the refusal
message: an empty or garbled file (a crash between create and write) blocks nothing.

Release removes the file while still holding the lock, so a run that cannot start leaves its
folder empty for the CLI to take back. Removing a locked path is safe only because `acquire`
checks, once it holds a lock, that the file it locked is still the one at the path: a driver
that opened the file before the holder removed it, and locked it after, finds it gone and
starts over on the path's current file, where the lock is decided again.

What it does not cover:
- NFS (EFS too): Linux clients since 2.6.12 emulate flock as a whole-file byte-range lock the
  server arbitrates, so drivers on different nodes do exclude each other (the emulation needs
  the file open for writing: it is). A share mounted with `local_lock=flock` or `local_lock=all`
  keeps locks on each node, and then only drivers on the same node exclude each other. NFSv4
  locks live on the client's lease: a node that dies holding the lock frees it only when the
  server's lease runs out (90 s by default on a Linux server), and a node cut off from the
  server for longer than that loses the lock while its driver still runs.
- The lock is advisory: it keeps out other drivers, not other programs writing the folder.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from raycnn.errors import LockedError

LOCK_FILE = "driver.lock"
# Each start-over means another driver took and released the lock between our open and our
# flock; this many in a row does not happen short of a bug, so then we give up with a message.
ATTEMPTS = 5
UNKNOWN = "a driver that has not recorded its host and pid"


def _same_file(fd: int, path: Path) -> bool:
    """Whether `fd` is the file now at `path` (not one removed from it since it was opened)."""
    try:
        mine, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:                    # gone; ESTALE on NFS once another client removed it
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _holder(fd: int) -> str:
    """'pid P on H' from the lock file's text, or UNKNOWN where the text is not a record we wrote
    (empty, being written, garbled): the message must stay one line whatever the file holds."""
    try:
        record = json.loads(os.pread(fd, 4096, 0))
        pid, host = record["pid"], record["host"]
    except (OSError, ValueError, TypeError, KeyError):
        return UNKNOWN
    if type(pid) is not int or not isinstance(host, str) or not host.isprintable() or not 0 < len(host) <= 255:
        return UNKNOWN
    return f"pid {pid} on {host}"


class RunLock:
    """`with RunLock(run_dir):` holds the run folder for this process, or raises LockedError
    naming the driver that holds it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise LockedError naming its holder."""
        for _ in range(ATTEMPTS):
            fd = self._open()
            if self._lock(fd) and _same_file(fd, self.path):
                self._fd = fd
                self._record(fd)
                return
            os.close(fd)               # locked a file its holder had just removed: start over
        raise LockedError(f"cannot lock {self.path}: it was replaced {ATTEMPTS} times while locking")

    def _open(self) -> int:
        # O_NOFOLLOW: a link planted at the lock's path must not make us truncate its target.
        # Opened for writing: NFS's flock emulation needs that for an exclusive lock.
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise LockedError(f"cannot open the lock {self.path}: {e.strerror or e}") from None

    def _lock(self, fd: int) -> bool:
        """flock(fd) without waiting; False if the file vanished under us, LockedError if held."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockedError(f"run {self.path.parent} is driven by {holder} (lock {self.path})") from None
        except OSError as e:
            if e.errno == errno.ESTALE:       # NFS: removed by another client since we opened it
                return False
            os.close(fd)
            raise LockedError(f"cannot lock {self.path}: {e.strerror or e} (its filesystem must support flock)") from None

    def _record(self, fd: int) -> None:
        # Written in place, not by rename: the lock belongs to this file, a new one would be unlocked.
        # Readers meet an empty or partial text at worst, and `_holder` reads that as UNKNOWN.
        # The text only names the holder in refusals, so failing to write it does not stop the run.
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self.me).encode(), 0)
        except OSError:
            pass

    def release(self) -> None:
        """Remove the lock file while still holding it (if it is still ours), then let go."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)         # closing the file drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
