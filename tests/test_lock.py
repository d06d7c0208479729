"""One driver per run folder: a second `raycnn run --name X --resume` refuses in one line and
changes nothing; a lock left by a dead process is taken over."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from raycnn.errors import LockedError
from raycnn.lock import LOCK_FILE, RunLock
from test_faults import BASE_ENV, FAULT_SUITE, raycnn, snapshot


@pytest.fixture
def other_driver():
    """A live process on this host, standing in for a driver that holds a lock."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_driver_refuses_and_changes_nothing(tmp_path, other_driver):
    suite = tmp_path / "ft.toml"
    suite.write_text(FAULT_SUITE)
    run = tmp_path / "results" / "r"
    (run / "tune" / "experiment").mkdir(parents=True)
    (run / "trials.parquet").write_bytes(b"PAR1 earlier trials")
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": other_driver}))
    before = snapshot(run)

    out = raycnn("run", suite, "--synthetic", "--num-cpus", "1", "--results-dir", run.parent, "--name", "r",
                 "--resume", env={**os.environ, **BASE_ENV}, timeout=300)

    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raycnn: error: run "), out.stderr
    assert f"driven by pid {other_driver} on {socket.gethostname()}" in lines[0]
    assert snapshot(run) == before


def test_lock_names_its_holder_and_is_released(tmp_path):
    with RunLock(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_FILE).read_text()) == {"host": socket.gethostname(), "pid": os.getpid()}
        with pytest.raises(LockedError, match=f"driven by pid {os.getpid()}"):
            RunLock(tmp_path).acquire()       # this process again: still one driver
        assert lock.path.exists()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_dead_drivers_lock_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "other-host", "pid": dead_pid()}))
    with pytest.raises(LockedError, match="on other-host"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "other-host"
