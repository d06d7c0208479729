"""Versions and git revision of the code that runs the trials; Ray-free.

On a cluster the code is synced without `.git`, so the revision travels as a file:
`python -m raycnn.provenance` writes REVISION at the project root (run it before `ray up`;
cluster.yaml syncs it with the code), and `provenance()` reads it where git cannot answer.
"""
from __future__ import annotations

import platform
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

from raycnn.files import atomic_text

ROOT = Path(__file__).resolve().parent.parent
REVISION_FILE = "REVISION"


def git_revision(root: Path = ROOT) -> str:
    """The checkout's short revision, `-dirty` if tracked files changed; "" without git."""
    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        if not (root / ".git").exists():
            return ""        # else git would answer for an enclosing repository
        rev = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{rev}-dirty" if rev and dirty else rev


def revision(root: Path = ROOT) -> str:
    """git's answer, else the REVISION file synced with the code, else "unknown"."""
    rev = git_revision(root)
    if not rev:
        try:
            rev = (root / REVISION_FILE).read_text().strip()
        except OSError:
            rev = ""
    return rev or "unknown"


def write_revision(root: Path = ROOT) -> str:
    """Write ROOT/REVISION from git (atomically) and return it."""
    rev = git_revision(root)
    if not rev:
        raise SystemExit(f"raycnn: error: {root} is not a git checkout; no revision to write")
    atomic_text(root / REVISION_FILE, rev + "\n")
    return rev


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def provenance() -> dict:
    """The fields every result row carries about the code and its stack."""
    return dict(_provenance())


@cache      # once per process: a worker asks for every trial it runs
def _provenance() -> dict:
    import torch, torchvision      # their own version strings (with the CUDA build, e.g. +cu130)
    return {"git_rev": revision(), "torch_version": torch.__version__,
            "torchvision_version": torchvision.__version__, "ray_version": _version("ray"),
            "python_version": platform.python_version()}


if __name__ == "__main__":
    print(write_revision(), file=sys.stdout)
