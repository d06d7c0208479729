"""The driver process's plumbing during a run: Ray's output into a file, SIGTERM as Ctrl-C.
Ray-free (it acts on file descriptors and signals only)."""
from __future__ import annotations

import os
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from raycnn.errors import UserError
from raycnn.storage import Place


@contextmanager
def output_to(path: Path):
    """Within the block, what Ray prints (its C++ logs on fd 2, its Python lines on stdout) goes
    to `path`; raycnn's own lines (sys.stderr: the live view, warnings) still reach the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    py_out, py_err = sys.stdout, sys.stderr
    with open(path, "a", buffering=1) as log:
        terminal = os.fdopen(os.dup(saved[2]), "w", buffering=1)
        try:
            sys.stdout, sys.stderr = log, terminal
            for fd in (1, 2):
                os.dup2(log.fileno(), fd)
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd in (1, 2):
                os.dup2(saved[fd], fd)
                os.close(saved[fd])
            sys.stdout, sys.stderr = py_out, py_err
            terminal.close()


@contextmanager
def output_to_place(place: Place):
    """`output_to` a file in the run folder. An object in a bucket cannot be appended to, so there
    Ray's output goes to a local file first, which replaces the object when the block ends (a
    resumed run's log starts with the one it had)."""
    if place.local:
        with output_to(place.local):
            yield
        return
    with tempfile.TemporaryDirectory(prefix="raycnn-") as tmp:
        local = Path(tmp) / place.name
        try:
            local.write_bytes(place.read_bytes())
        except OSError:             # none yet (or unreadable: the new one replaces it)
            pass
        try:
            with output_to(local):
                yield
        finally:
            try:
                place.write_bytes(local.read_bytes())
            except UserError:       # the log is a courtesy: losing it must not hide the run's own error
                pass


def _as_sigint(*_) -> None:
    os.kill(os.getpid(), signal.SIGINT)


@contextmanager
def sigterm_as_sigint():
    """Within the block SIGTERM acts as Ctrl-C: inside Tuner.fit Tune stops gracefully on SIGINT
    (fit returns); elsewhere the KeyboardInterrupt unwinds as usual. `again()` re-installs it
    (ray.init installs a handler of its own that aborts)."""
    previous = signal.signal(signal.SIGTERM, _as_sigint)
    try:
        yield lambda: signal.signal(signal.SIGTERM, _as_sigint)
    finally:
        signal.signal(signal.SIGTERM, previous)
