"""What travels to the cluster's nodes with the code: the git revision (synced without .git)
and --weights files (read once by the driver, shipped through the object store)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from raycnn.provenance import REVISION_FILE

ROOT = Path(__file__).resolve().parents[1]


def git(*args, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def revision_in(root: Path) -> str:
    code = "from raycnn.provenance import provenance; print(provenance()['git_rev'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_a_copy_without_git_records_the_real_revision(tmp_path):
    clone = tmp_path / "clone"
    git("clone", "--quiet", str(ROOT), str(clone), cwd=tmp_path)
    rev = git("rev-parse", "--short=12", "HEAD", cwd=clone)
    # What docs/cluster.md has users run before `ray up`:
    subprocess.run([sys.executable, "-m", "raycnn.provenance"], cwd=clone, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(clone)})
    # cluster.yaml's rsync filter drops what .gitignore ignores: REVISION must not be among it.
    assert subprocess.run(["git", "check-ignore", "-q", REVISION_FILE], cwd=clone).returncode == 1
    synced = tmp_path / "synced"                     # the nodes' copy: no .git
    shutil.copytree(clone, synced, ignore=shutil.ignore_patterns(".git"))
    assert revision_in(synced) == rev
    (synced / REVISION_FILE).unlink()                # without the file there is nothing to tell
    assert revision_in(synced) == "unknown"


def test_weights_are_read_by_the_driver_and_shipped(tmp_path):
    from raycnn.trial import WEIGHTS_KEY
    from raycnn.tune import shipped
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"state dict bytes")
    params = [{"config": {"model": "mnist_base", "synthetic": True, "weights": str(weights)}}]
    objects, digests = shipped(params)
    assert objects[WEIGHTS_KEY] == b"state dict bytes"
    assert set(objects) == {"mnist-synthetic", WEIGHTS_KEY}     # by no path: a resume may find the file elsewhere
    # the plan keeps the inputs by content, so a resume can tell another file at the same path
    assert digests["weights"] == hashlib.sha256(b"state dict bytes").hexdigest() and set(digests) == {"mnist-synthetic", "weights"}
