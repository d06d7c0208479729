"""One driver per run folder: the driver holds RUN_DIR/driver.lock for its whole life. On a local
or shared filesystem that is an OS lock (`RunLock`, flock); in a bucket, where there is no flock,
a lease (`LeaseLock`). `hold(run_dir)` picks the one the folder's filesystem allows.

## flock (`RunLock`)

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

## A lease in a bucket (`LeaseLock`)

Object storage has no locks, and pyarrow.fs offers no conditional PUT (S3's `If-None-Match`),
so this lease rests on timing, the weaker rule: a driver reads the lock object; if another
driver's lease has not expired, it refuses. Otherwise it writes its own record (host, pid, a
random token, the lease's end), waits SETTLE_S, reads the object back and holds the lock only if
its own token is still there; a driver that lost a race sees the winner's record and refuses.
While it runs it renews the lease every LEASE_S / 4 seconds; a driver that dies stops renewing,
and its lease is free LEASE_S seconds after the last renewal. What holds:
- Two drivers exclude each other if neither pauses for longer than SETTLE_S between reading the
  object and writing it (the later writer's record is there when the earlier one reads back).
  S3 and GCS read back what was written at once (strong read-after-write consistency).
- Lease ends are compared on each driver's own clock: clocks must agree within a few seconds
  (NTP), far less than LEASE_S.
- A driver cut off from the bucket for longer than LEASE_S loses the lease while it runs, and a
  new driver may take the folder; the old one finds out at its next renewal and says so in a
  warning. A dead driver's folder is free to resume LEASE_S after its death, not at once.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from raycnn import storage
from raycnn.errors import LockedError, UserError
from raycnn.storage import Place

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


# Seconds a lease lasts without renewal, and the wait between writing a lease and reading it back
# (tests shorten both).
LEASE_S = float(os.environ.get("RAYCNN_LEASE_S", "60"))
SETTLE_S = float(os.environ.get("RAYCNN_LEASE_SETTLE_S", "2"))


class LeaseLock:
    """`with LeaseLock(run_dir):` holds a run folder in a bucket by a lease (see the module's
    doc for what holds), or raises LockedError naming the driver whose lease runs."""

    def __init__(self, run_dir: Place):
        self.place = run_dir / LOCK_FILE
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "token": secrets.token_hex(16)}
        self.lost = ""                              # whose record the renewal found instead of ours
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _read(self) -> dict:
        """The lock object's record, {} where there is none or it is not one we wrote."""
        try:
            data = self.place.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise LockedError(f"cannot read the lock {self.place}: {storage.first_line(e)}") from None
        try:
            record = json.loads(data)
        except ValueError:      # garbled: blocks nothing, as an empty flock file does
            return {}
        return record if isinstance(record, dict) else {}

    def _write(self) -> None:
        self.place.write_text(json.dumps(self.me | {"expires": time.time() + LEASE_S}))

    def _ours(self, record: dict) -> bool:
        return record.get("token") == self.me["token"]

    def acquire(self) -> None:
        """Take the lease, or raise LockedError naming the driver that holds it."""
        held = self._read()
        if held and not self._ours(held) and _expires(held) > time.time():
            raise LockedError(f"run {self.place.parent} is driven by {_holder_of(held)} (lease {self.place}, "
                              f"free {LEASE_S:g} s after that driver stops renewing it)")
        self._write()
        time.sleep(SETTLE_S)
        now = self._read()
        if not self._ours(now):
            raise LockedError(f"run {self.place.parent} was taken by {_holder_of(now)} while this driver locked it "
                              f"(lease {self.place})")
        self._renewer = threading.Thread(target=self._renew, name="raycnn-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_S / 4):
            try:
                record = self._read()
                if not self._ours(record):
                    self.lost = _holder_of(record) if record else "nobody (the lease object is gone)"
                    logging.getLogger("raycnn").warning("lost the lease on %s to %s", self.place.parent, self.lost)
                    return
                self._write()
            except UserError as e:     # the bucket out of reach for a moment: try again next time
                logging.getLogger("raycnn").warning("could not renew the lease on %s: %s", self.place.parent, e)

    def release(self) -> None:
        """Stop renewing and remove the lease object if it is still ours."""
        if self._renewer is None:
            return
        self._stop.set()
        self._renewer.join()
        self._renewer = None
        try:
            if self._ours(self._read()):
                self.place.unlink()
        except (OSError, UserError):   # it expires on its own
            pass

    def __enter__(self) -> "LeaseLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _expires(record: dict) -> float:
    value = record.get("expires")
    return float(value) if isinstance(value, (int, float)) else 0.0


def _holder_of(record: dict) -> str:
    """'pid P on H' from a lease record, or UNKNOWN: the message stays one line whatever it holds."""
    pid, host = record.get("pid"), record.get("host")
    if type(pid) is not int or not isinstance(host, str) or not host.isprintable() or not 0 < len(host) <= 255:
        return UNKNOWN
    return f"pid {pid} on {host}"


def hold(run_dir: str | Path | Place) -> RunLock | LeaseLock:
    """The lock for a run folder: flock where it is on a filesystem, a lease in a bucket."""
    place = storage.resolve(run_dir)
    return RunLock(place.local) if place.local else LeaseLock(place)
