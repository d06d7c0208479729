"""Checkpoint files: what a trial writes after an epoch to resume from (state.pt) and the best
epoch's model (best.pt), and the one way they are read back.

Reading never runs code: `torch.load(weights_only=True)` builds tensors and plain containers
only, and refuses a file whose pickle asks for anything else (a run folder, copied from a
shared filesystem or a bucket, is not trusted to hold only what raycnn wrote).
"""
from __future__ import annotations

import io
import posixpath
from pathlib import Path
from typing import BinaryIO

import torch

from raycnn import storage
from raycnn.errors import CheckpointError
from raycnn.files import atomic

STATE_FILE = "state.pt"          # everything needed to resume: model, optimizer, scheduler, RNGs, progress
BEST_FILE = "best.pt"            # the best epoch's model, beside the last epoch's state


def save(state: dict, directory: str | Path, name: str = STATE_FILE) -> Path:
    """Write `state` to directory/name, atomically and durably."""
    return atomic(Path(directory) / name, lambda tmp: torch.save(state, tmp))


def read(path: str | Path, mmap: bool = False) -> dict:
    """A checkpoint's contents, on the CPU; CheckpointError (one line) if the file cannot be
    read or holds anything but tensors and plain values. `mmap` maps tensors instead of
    reading them (for checking a file without loading it)."""
    path = Path(path)
    path = path / STATE_FILE if path.is_dir() else path
    return _load(path, path, mmap)


def _load(source: Path | BinaryIO, shown, mmap: bool = False) -> dict:
    """torch.load of a file or a file-like object, the safe way; `shown` names it in errors."""
    try:
        state = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:      # torch raises several types for a bad file; all mean "not loaded"
        detail = _reason(str(e))
        raise CheckpointError(f"checkpoint {shown} refused ({type(e).__name__}: {detail})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {shown} refused: not a raycnn checkpoint")
    return state


# The lines of torch's weights_only refusal that advise rather than say what was refused.
_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")


def _reason(message: str) -> str:
    """What torch's error says was wrong with the file, without its advice on weights_only (a
    refusal names the global or the opcode it met between paragraphs of advice); else its first line."""
    lines = [line.strip() for line in message.strip().splitlines()] or [""]
    said = [line.removeprefix("WeightsUnpickler error:").strip() for line in lines
            if line and not line.startswith(_ADVICE)]
    return next((line for line in said if line), lines[0])[:200]


def check_all(folder: str | Path | storage.Place) -> int:
    """Read every checkpoint file under `folder` (a local folder or one in a bucket) the safe
    way; the number checked, or CheckpointError naming the first that is refused."""
    folder = storage.resolve(folder)
    files = sorted(rel for rel in folder.tree() if posixpath.basename(rel) in (STATE_FILE, BEST_FILE))
    for rel in files:
        place = folder / rel
        try:
            _load(place.local or io.BytesIO(place.read_bytes()), place)
        except OSError as e:
            raise CheckpointError(f"checkpoint {place} unreadable ({storage.first_line(e)}); remove it to train that "
                                  f"trial again from scratch") from None
        except CheckpointError as e:
            raise CheckpointError(f"{e}; remove it to train that trial again from scratch") from None
    return len(files)
