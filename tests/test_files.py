"""Writes are atomic and durable, and a full disk is one line naming the file, with the earlier
file intact: tried on a filesystem that really runs full (a small tmpfs where this process may
mount one, else a file-size limit, which the kernel enforces the same way: the write fails)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raycnn import files, results
from raycnn.errors import ResultsError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 256 KiB tmpfs, unmounted afterwards; skipped where mounting is not allowed
    (the file-size-limit test below covers that case)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def _rows(n: int) -> list[dict]:
    return [{"name": f"t{i}", "repeat": 0, "epoch": 1, "blob": os.urandom(64).hex()} for i in range(n)]


def test_a_full_disk_leaves_the_earlier_results_whole(small_disk):
    results.write_run(small_disk, _rows(3), _rows(3))
    before = {p.name: p.read_bytes() for p in small_disk.iterdir()}
    with pytest.raises(ResultsError) as err:
        results.write_run(small_disk, _rows(2000), _rows(2000))     # ~300 KiB: more than the disk holds
    message = str(err.value)
    assert "\n" not in message and "cannot write" in message and str(small_disk) in message
    assert "No space left on device" in message
    assert {p.name: p.read_bytes() for p in small_disk.iterdir()} == before   # no litter, nothing changed
    trials, epochs = results.load_run(small_disk)
    assert len(trials) == len(epochs) == 3


def test_a_size_limit_is_a_full_disk_too(tmp_path):
    """Under RLIMIT_FSIZE (SIGXFSZ ignored, so the write fails with EFBIG instead of killing),
    through the command line: `raycnn report` says one line and exits 2; the old page stays."""
    run = ROOT / "results" / "cifar10-base-quick"        # a published run: read only
    out = tmp_path / "page.html"
    out.write_text("the earlier page")
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
            "from raycnn import cli\n"
            f"sys.exit(cli.main(['report', {str(run)!r}, '-o', {str(out)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"raycnn: error: cannot write {out}") and "File too large" in lines[0]
    assert out.read_text() == "the earlier page" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_atomic_writes_are_flushed_to_disk(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    files.atomic_text(tmp_path / "a.txt", "x")
    assert synced[0].startswith(str(tmp_path / ".a.txt.")) and synced[1] == str(tmp_path)   # the file, then its folder
    synced.clear()
    files.atomic_text(tmp_path / "p.json", "{}", durable=False)
    assert synced == [] and (tmp_path / "p.json").read_text() == "{}"
