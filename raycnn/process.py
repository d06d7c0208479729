"""The driver process's plumbing during a run: Ray's output into a file, SIGTERM as Ctrl-C.
Ray-free (it acts on file descriptors and signals only)."""
from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path


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
