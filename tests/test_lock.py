"""One driver per run folder, with real processes contending for it: of drivers starting at once
exactly one holds the run and the others refuse in one line; a killed driver's lock is free at
once; an empty or garbled lock file blocks nothing; release leaves no file for a later driver to
trip on; a second `raycnn run --name X --resume` refuses and changes nothing."""
from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import raycnn
from raycnn.errors import LockedError
from raycnn.lock import LOCK_FILE, UNKNOWN, RunLock

ROOT = Path(raycnn.__file__).resolve().parents[1]

# A driver in a process of its own: on each line from the test it tries the lock ("try"), says
# what came of it as one JSON line, and lets go on the next line ("end").
CONTENDER = r"""
import json, sys
from raycnn.errors import LockedError
from raycnn.lock import RunLock
while sys.stdin.readline():
    lock = RunLock(sys.argv[1])
    try:
        lock.acquire()
        print(json.dumps({"held": True}), flush=True)
    except LockedError as e:
        lock = None
        print(json.dumps({"held": False, "message": str(e)}), flush=True)
    sys.stdin.readline()
    if lock:
        lock.release()
    print("{}", flush=True)
"""

# Drivers taking and releasing the lock as fast as they can, from one "go" line on. While it
# holds the lock each creates a marker file with O_EXCL: a second holder at the same time
# finds it there. Prints (times it held the lock, times the marker was there).
CHURN = r"""
import json, os, sys
from raycnn.errors import LockedError
from raycnn.lock import RunLock
run, marker, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.stdin.readline()
held = clashes = 0
for _ in range(rounds):
    try:
        with RunLock(run):
            held += 1
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                clashes += 1
                continue
            os.unlink(marker)
    except LockedError:
        pass
print(json.dumps([held, clashes]), flush=True)
"""

# Holds the run until its stdin closes (or it is killed); says "held" once it does.
HOLDER = r"""
import sys
from raycnn.lock import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def child_env() -> dict:
    """The environment for a child Python that imports this checkout's raycnn."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore::DeprecationWarning",
            "RAY_USAGE_STATS_ENABLED": "0"}


def start(script: str, *args, stderr) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=stderr, bufsize=0, env=child_env())


def read_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    """One line from a child's stdout (unbuffered, so `select` sees all there is)."""
    buf, deadline = b"", time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        if not select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            pytest.fail(f"no line from pid {proc.pid} within {timeout:.0f}s")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            pytest.fail(f"pid {proc.pid} ended (rc {proc.wait()})")
        buf += chunk
    return buf.decode()


def say(procs: list[subprocess.Popen], line: str) -> None:
    for p in procs:
        p.stdin.write(line.encode())


@pytest.fixture
def children(tmp_path):
    """Start child processes; whatever the test leaves running is stopped, by its pid."""
    started = []

    def spawn(script: str, *args) -> subprocess.Popen:
        err = open(tmp_path / f"child-{len(started)}.err", "w")
        proc = start(script, *args, stderr=err)
        err.close()
        started.append(proc)
        return proc

    yield spawn
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


def refusal(message: str, run: Path) -> str:
    """Who the refusal names, after checking it is LockedError's one line for `run`."""
    assert "\n" not in message, message
    m = re.fullmatch(rf"run {re.escape(str(run))} is driven by (.+) \(lock {re.escape(str(run / LOCK_FILE))}\)", message)
    assert m, message
    return m.group(1)


def test_of_drivers_starting_at_once_exactly_one_holds_the_run(tmp_path, children):
    run = tmp_path / "run"
    procs = [children(CONTENDER, run) for _ in range(8)]
    me = socket.gethostname()
    for round_ in range(20):
        say(procs, "try\n")                     # all at once; none lets go before all have tried
        answers = [json.loads(read_line(p)) for p in procs]
        holders = [p.pid for p, a in zip(procs, answers) if a["held"]]
        assert len(holders) == 1, (round_, answers)
        for a in answers:
            if not a["held"]:
                assert refusal(a["message"], run) in (f"pid {holders[0]} on {me}", UNKNOWN), (round_, a)
        say(procs, "end\n")
        for p in procs:
            read_line(p)
        assert not (run / LOCK_FILE).exists(), round_


def test_drivers_taking_turns_never_hold_it_together(tmp_path, children):
    """Each release removes the file while others may have it open: of a driver that locks the
    removed file and one that locks the new file, only the latter may go on."""
    run, marker = tmp_path / "run", tmp_path / "inside"
    procs = [children(CHURN, run, marker, 1000) for _ in range(8)]
    say(procs, "go\n")
    counts = [json.loads(read_line(p, timeout=120)) for p in procs]
    assert sum(held for held, _ in counts) > 0, counts
    assert sum(clashes for _, clashes in counts) == 0, counts


def test_a_killed_drivers_lock_is_free_at_once(tmp_path, children):
    holder = children(HOLDER, tmp_path)
    assert read_line(holder) == "held\n"
    with pytest.raises(LockedError, match=f"driven by pid {holder.pid} on "):
        RunLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid   # left behind
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text()) == {"host": socket.gethostname(), "pid": os.getpid()}


LEFTOVERS = {"empty": b"", "garbage": b"\x00\xffnot json{", "half-written": b'{"host": "n1", "pi',
             "wrong types": b'{"host": ["n1"], "pid": "7"}', "newline in host": b'{"host": "a\\nb", "pid": 7}'}


@pytest.mark.parametrize("text", LEFTOVERS.values(), ids=LEFTOVERS.keys())
def test_an_empty_or_garbled_lock_file_blocks_nothing(tmp_path, text):
    (tmp_path / LOCK_FILE).write_bytes(text)
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("text", LEFTOVERS.values(), ids=LEFTOVERS.keys())
def test_a_holder_whose_file_is_garbled_is_refused_in_one_line(tmp_path, text):
    with RunLock(tmp_path):
        (tmp_path / LOCK_FILE).write_bytes(text)          # same file, other text: still locked
        with pytest.raises(LockedError) as refused:
            RunLock(tmp_path).acquire()
    assert refusal(str(refused.value), tmp_path) == UNKNOWN


def test_lock_names_its_holder_and_release_removes_it(tmp_path):
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text()) == {"host": socket.gethostname(), "pid": os.getpid()}
        with pytest.raises(LockedError, match=f"driven by pid {os.getpid()} on {socket.gethostname()}"):
            RunLock(tmp_path).acquire()       # this process again: still one driver
    assert not (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path):                   # and the next driver takes it
        pass


def test_release_leaves_a_lock_file_that_is_no_longer_its_own(tmp_path):
    """Someone removed the file by hand and another driver locked a new one: releasing the old
    lock must not remove the new driver's file (a third driver could then lock beside it)."""
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.path.unlink()
    with RunLock(tmp_path):
        lock.release()
        assert (tmp_path / LOCK_FILE).exists()
        with pytest.raises(LockedError, match=f"driven by pid {os.getpid()}"):
            RunLock(tmp_path).acquire()


def test_a_link_at_the_lock_path_is_not_followed(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).symlink_to(target)
    with pytest.raises(LockedError, match="cannot open the lock"):
        RunLock(tmp_path / "run").acquire()
    assert target.read_text() == "keep me"


# ---------------------------------------------------------------- through the command line

SUITE = """
[suite]
name = "lk"
cpus_per_trial = 1

[defaults]
model = "mnist_base"
max_train_samples = 64

[[trials]]
name = "one"
epochs = 1
"""


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root, with the bytes of each file (None for folders)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_a_second_driver_refuses_and_changes_nothing(tmp_path, children):
    suite = tmp_path / "lk.toml"
    suite.write_text(SUITE)
    run = tmp_path / "results" / "r"
    (run / "tune" / "experiment").mkdir(parents=True)
    (run / "trials.parquet").write_bytes(b"PAR1 earlier trials")
    (run / "plan.json").write_text('{"entries": []}')
    holder = children(HOLDER, run)
    assert read_line(holder) == "held\n"
    before = tree(run)

    out = subprocess.run([sys.executable, "-m", "raycnn.cli", "run", str(suite), "--synthetic", "--num-cpus", "1",
                          "--results-dir", str(run.parent), "--name", "r", "--resume"],
                         capture_output=True, text=True, env=child_env(), timeout=300)

    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raycnn: error: run "), out.stderr
    assert f"driven by pid {holder.pid} on {socket.gethostname()}" in lines[0]
    assert tree(run) == before
