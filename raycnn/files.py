"""Atomic, durable file writes: the one way raycnn writes a file that someone reads back.

`atomic(path, write)` runs `write(tmp)` on a temp file beside `path`, flushes it to the disk,
renames it over `path` and flushes the folder, so a reader sees the old file or the new one,
never half of one, and after a crash or power loss the file is the old one or the new one.
A failed write (a full disk, say) leaves no litter and the old file as it was, and raises
ResultsError naming the file, in one line.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from raycnn.errors import ResultsError


def atomic(path: str | Path, write: Callable[[str], None], durable: bool = True) -> Path:
    """Write `path` through `write(tmp)` atomically; `durable=False` skips the fsyncs, for
    files whose loss costs nothing (a trial's progress, rewritten every few seconds)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise ResultsError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        # mkstemp makes the file private (0600); results are for everyone who may read the folder
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        write(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ResultsError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    return path


def atomic_text(path: str | Path, text: str, durable: bool = True) -> Path:
    """`atomic` for a text file (UTF-8)."""
    return atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), durable)


def _fsync(path: str | Path) -> None:
    """Flush a file's (or a folder's) data to the disk: a rename is durable only once the
    renamed file's bytes and the folder's new entry both are."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
