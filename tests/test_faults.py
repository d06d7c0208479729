"""Scale out and survive faults, through the `raycnn` command as a user runs it.

- bad input: one table of mistakes; each ends in exit 2 and one line on stderr, before Ray
  starts where it can, and leaves earlier results byte for byte as they were (fast, except the
  cases that need a Ray cluster or a run to resume);
- several Ray nodes on one machine (`ray start` head + worker on loopback): trials land on both
  and their results in one run folder (slow);
- a trial's worker process SIGKILLed mid-epoch: the trial restarts from its last checkpoint
  and ends with each epoch exactly once (slow);
- the driver interrupted by SIGINT, its resume by SIGTERM: exit 130 and the resume command;
  the resumes run only what is unfinished, from checkpoints, losing and duplicating nothing (slow).

Every Ray started here lives under a private RAY_TMPDIR (or --temp-dir) and is stopped by the
process ids it started: never `ray stop`, which would stop every Ray on the machine.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from raycnn import epoch_progress, results

PY = sys.executable
# The clusters these tests start have token auth on, as a user's should: drivers join with the token.
BASE_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "COLUMNS": "200", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0", "PYTHONWARNINGS": "ignore::DeprecationWarning"}

# Trials small enough for 2 CPU cores: 1024 synthetic MNIST images a training epoch (the test
# split stays whole: 10000 images), one torch thread each.
FAULT_SUITE = """
[suite]
name = "ft"
cpus_per_trial = 1

[defaults]
model = "mnist_base"
momentum = 0.9
max_train_samples = 1024
eval_batch_size = 2000

[[trials]]
name = "short"
epochs = 1

[[trials]]
name = "long"
epochs = 3

[[trials]]
name = "later"
epochs = 3
"""


# ---------------------------------------------------------------- helpers

@pytest.fixture
def ray_tmp():
    """A short private RAY_TMPDIR (Ray's socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def cli_env(ray_tmp: Path, **extra) -> dict:
    return {**os.environ, **BASE_ENV, "RAY_TMPDIR": str(ray_tmp), **extra}


def raycnn(*args, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    """`raycnn ARGS` in a subprocess, to the end."""
    return subprocess.run([PY, "-m", "raycnn.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


class Background:
    """`raycnn ARGS` running in a subprocess, to be signalled; output goes to files (no pipe
    to fill up while the test waits)."""

    def __init__(self, *args, env: dict, logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        self.out, self.err = logs / "stdout.txt", logs / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([PY, "-m", "raycnn.cli", *map(str, args)], stdout=out, stderr=err,
                                         env=env)

    def wait(self, timeout: float = 900) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        return rc, self.out.read_text(), self.err.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def reported(ray_root: Path) -> dict[str, list[dict]]:
    """Each trial's results as Tune's driver logged them so far, by trial folder name.

    Read from the driver's staging copy of result.json (under the Ray session folder, written
    and flushed on every report); the copy in the run folder is synced only now and then."""
    out: dict[str, list[dict]] = {}
    for path in sorted(ray_root.glob("**/driver_artifacts/*/result.json")):
        lines = []
        for line in path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass          # being written
        out.setdefault(path.parent.name, []).extend(lines)
    return out


def wait_for(what: str, check, timeout: float, proc: Background | None = None, every: float = 0.5):
    """Poll check() until it returns something truthy; fail after timeout or if proc ended."""
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        if proc is not None and proc.proc.poll() is not None:
            pytest.fail(f"raycnn ended (rc {proc.proc.returncode}) before {what}:\n{proc.err.read_text()[-3000:]}")
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root, with the bytes of each file (None for folders)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def ray_sessions(ray_tmp: Path) -> list[Path]:
    return list(ray_tmp.glob("ray/session_2*"))


def epochs_of(epochs: pd.DataFrame, name: str) -> pd.DataFrame:
    return epochs[epochs.name == name].sort_values("epoch").reset_index(drop=True)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------- an interrupted run

@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run of FAULT_SUITE on one CPU, SIGINTed once a trial has finished and another has
    checkpointed an epoch: (suite file, results dir, run name, its process result, a copy of
    its run folder made right after the interrupt)."""
    tmp = tmp_path_factory.mktemp("interrupted")
    suite = tmp / "ft.toml"
    suite.write_text(FAULT_SUITE)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    try:
        res = tmp / "results"
        run = Background("run", suite, "--synthetic", "--num-cpus", "1", "--max-concurrent", "1",
                         "--results-dir", res, "--name", "r", env=cli_env(ray_tmp), logs=tmp / "run1")
        try:
            def ready():
                trials = reported(ray_tmp).values()
                done = [t for t in trials if t and t[-1].get("finished")]
                going = [t for t in trials if t and not t[-1].get("finished")]
                return done and going
            wait_for("a finished trial and a checkpointed one", ready, timeout=900, proc=run)
            run.proc.send_signal(signal.SIGINT)
            rc, out, err = run.wait(timeout=300)
        finally:
            run.stop()
        copy = tmp / "copy" / "results"
        shutil.copytree(res, copy, ignore=shutil.ignore_patterns(".*.tmp"))
        parquet = {f: (res / "r" / f).read_bytes() for f in ("trials.parquet", "epochs.parquet")}
        yield suite, res, "r", (rc, out, err, parquet), copy
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ---------------------------------------------------------------- bad input

BAD_SUITE = """
[suite]
name = "bad"
[defaults]
model = "mnist_base"
epochs = 1

[[trials]]
name = "one"
{extra}
"""

PREV = {"trials.parquet": b"PAR1 earlier trials", "epochs.parquet": b"PAR1 earlier epochs",
        "tune/experiment/000-prev-r0/result.json": b'{"epoch": 1}\n', "plots/t.png": b"\x89PNG"}


def _suite(tmp: Path, extra: str) -> Path:
    path = tmp / "bad.toml"
    path.write_text(BAD_SUITE.format(extra=extra))
    return path


def _file_path(tmp: Path, res: Path) -> tuple:
    return ("--results-dir", res / "prev" / "trials.parquet" / "sub", "--name", "x")


def _corrupt(tmp: Path, res: Path, request) -> tuple:
    """The interrupted run's copy with the in-progress trial's checkpoint overwritten."""
    suite, _, name, _, copy = request.getfixturevalue("interrupted")
    trials, _ = results.load_run(copy / name)
    going = trials[trials.status == "running"]
    assert len(going), trials[["name", "status", "epochs_done"]]
    folder = next((copy / name / "tune" / "experiment").glob(f"*-{going.name.iloc[0].replace('/', '-')}-r0"))
    states = list(folder.glob("checkpoint_*/state.pt"))
    assert states, list(folder.iterdir())
    for state in states:
        state.write_bytes(b"garbage, not a checkpoint")
    request.node.corrupted = (going.name.iloc[0], copy / name)
    return ("run", suite, "--synthetic", "--num-cpus", "1", "--results-dir", copy, "--name", name, "--resume")


def _not_ray() -> str:
    """HOST:PORT of a server that answers, but not as Ray does (an HTTP/1 error to anything)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve():
        while True:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{server.getsockname()[1]}"


SYN = ("--synthetic", "--num-cpus", "1")
OFFLINE = {k: "http://127.0.0.1:1" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}


def _bad_suite(line: str, message: str) -> tuple:
    """A CASES entry: a one-trial suite file with `line` added must exit 2 with `message`, before Ray."""
    return (lambda t, r: ("run", _suite(t, line), *SYN, "--results-dir", r), 2, message, False, {})


# id: (argv after `raycnn`, or a function (tmp, results_dir[, request]) -> argv; exit code; stderr
#      must contain; Ray may start; extra environment)
CASES = {
    "unknown-suite": (lambda t, r: ("run", "nosuch", *SYN, "--results-dir", r), 2, "unknown suite 'nosuch'", False, {}),
    "unknown-model": _bad_suite('model = "nonet"', "unknown model 'nonet'"),
    "unknown-optimizer": _bad_suite('optimizer = "sgdd"', "unknown optimizer 'sgdd'"),
    "unknown-augmentation": _bad_suite('augment = ["rotate"]', "unknown augmentation(s) ['rotate']"),
    "unknown-key": _bad_suite("lernrate = 0.1", "bad.toml: trials[0] (one): unknown key 'lernrate'"),
    "not-toml": _bad_suite("lr = = 0.1", "bad.toml: cannot read suite"),
    "wrong-type": _bad_suite('lr = "fast"', "bad.toml: trial bad/one: lr must be float"),
    "zero-lr": _bad_suite("lr = 0.0", "lr must be positive, got 0.0"),
    "negative-batch-size": _bad_suite("batch_size = -8", "batch_size must be positive, got -8"),
    "hue-out-of-range": _bad_suite("hue = [-2.0, 2.0]",
                                   "bad.toml: trial bad/one: hue must be [lo, hi] with -0.5 <= lo <= hi <= 0.5, got [-2.0, 2.0]"),
    "hue-scalar-too-big": _bad_suite("hue = 0.7", "bad.toml: trial bad/one: hue = 0.7: a single number must be in [0, 0.5]"),
    "brightness-negative": _bad_suite("brightness = -0.4", "bad.toml: trial bad/one: brightness = -0.4: a single number must not be negative"),
    "negative-crop-padding": _bad_suite("crop_padding = -3", "bad.toml: trial bad/one: crop_padding must not be negative, got -3"),
    "flip-p-not-a-probability": _bad_suite("flip_p = 7", "bad.toml: trial bad/one: flip_p must be a probability in [0, 1], got 7.0"),
    "unsorted-milestones": _bad_suite("milestones = [22, 10]",
                                      "bad.toml: trial bad/one: milestones must be positive epochs in increasing order, got [22, 10]"),
    "pretrained-without-weights": _bad_suite("pretrained = true",
                                             "bad.toml: trial bad/one: pretrained = true needs a model with ImageNet weights (resnet18), not 'mnist_base'"),
    "unknown-normalize": _bad_suite('normalize = "zscore"', "bad.toml: trial bad/one: unknown normalize 'zscore'"),
    "imagenet-normalize-on-mnist": _bad_suite('normalize = "imagenet"', "bad.toml: trial bad/one: normalize = 'imagenet' is for 3-channel images"),
    "unknown-jitter-mode": _bad_suite('jitter_mode = "pil"', "bad.toml: trial bad/one: unknown jitter_mode 'pil'"),
    "val-fraction-all": _bad_suite("val_fraction = 1.0", "bad.toml: trial bad/one: val_fraction must be in [0, 1), got 1.0"),
    "zero-epochs": (lambda t, r: ("run", _suite(t, ""), *SYN, "--epochs", "0", "--results-dir", r), 2,
                    "--epochs must be positive, got 0", False, {}),
    "no-data-offline": (lambda t, r: ("run", "mnist", "--filter", "mnist/base/sgd/lr0.01", "--epochs", "1",
                                      "--num-cpus", "1", "--data-dir", t / "empty", "--results-dir", r),
                        2, "mnist files not found", False, OFFLINE),
    "unreachable-address": (lambda t, r: ("run", _suite(t, ""), "--synthetic", "--address", "127.0.0.1:1",
                                          "--results-dir", r), 2, "cannot reach a Ray cluster at 127.0.0.1:1", False, {}),
    "address-not-ray": (lambda t, r: ("run", _suite(t, ""), "--synthetic", "--address", _not_ray(),
                                      "--results-dir", r), 2, "answers, but not as a Ray cluster", False, {}),
    "results-dir-under-a-file": (lambda t, r: ("run", _suite(t, ""), *SYN, *_file_path(t, r)), 2,
                                 "cannot write results to", False, {}),
    "results-dir-uri": (lambda t, r: ("run", _suite(t, ""), *SYN, "--results-dir", "s3://bucket/results"), 2,
                        "URIs are not supported", False, {}),
    "name-exists": (lambda t, r: ("run", _suite(t, ""), *SYN, "--results-dir", r, "--name", "prev"), 2,
                    "exists: pass --resume", False, {}),
    "resume-nothing": (lambda t, r: ("run", _suite(t, ""), *SYN, "--results-dir", r, "--name", "nope", "--resume"),
                       2, "no run to resume", False, {}),
    "gpus-per-trial-too-many": (lambda t, r: ("run", _suite(t, ""), *SYN, "--results-dir", r,
                                              "--gpus-per-trial", "2"), 2, "more than any node has", True, {}),
    "corrupted-checkpoint": (_corrupt, 0, "is unreadable", True, {}),
}
SLOW_CASES = {"gpus-per-trial-too-many", "corrupted-checkpoint"}


def attempt(case: str, tmp: Path, ray_tmp: Path, request=None) -> dict:
    """Run one case against a results folder holding an earlier run; what came of it."""
    argv, _, _, _, extra_env = CASES[case]
    res = tmp / "results"
    for rel, content in PREV.items():            # an earlier run that must stay as it is
        (res / "prev" / rel).parent.mkdir(parents=True, exist_ok=True)
        (res / "prev" / rel).write_bytes(content)
    (tmp / "empty").mkdir(exist_ok=True)
    before = snapshot(res)
    args = argv(tmp, res, request) if argv is _corrupt else argv(tmp, res)
    start = time.time()
    out = raycnn(*args, env=cli_env(ray_tmp, **extra_env))
    return dict(out=out, took=time.time() - start, before=before, after=snapshot(res),
                ray_started=bool(ray_sessions(ray_tmp)))


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES])
def test_bad_input(case, tmp_path, ray_tmp, request):
    _, code, message, may_start_ray, _ = CASES[case]
    got = attempt(case, tmp_path, ray_tmp, request)
    out = got["out"]

    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    assert message in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    if code:
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("raycnn: error: "), out.stderr[-3000:]
    if not may_start_ray:
        assert not got["ray_started"], f"{case}: Ray started before the error ({got['took']:.0f}s)"
    assert got["after"] == got["before"]          # earlier results byte-identical, nothing added

    if case == "corrupted-checkpoint":
        name, run_dir = request.node.corrupted
        warning = [l for l in out.stderr.splitlines() if "is unreadable" in l]
        assert len(warning) == 1 and warning[0].startswith("raycnn: warning: ") and name in warning[0], out.stderr
        assert str(run_dir / "tune" / "experiment") in warning[0]      # the checkpoint as the user finds it
        trials, epochs = results.load_run(run_dir)
        row = trials[trials.name == name].iloc[0]
        assert row.status == "ok" and "unreadable" in row.warning, row.to_dict()
        mine = epochs_of(epochs, name)
        assert list(mine.epoch) == list(range(1, row.epochs + 1))
        assert not mine.resumed.any()             # started over: no epoch came from the checkpoint
        assert "unreadable" in mine.warning.iloc[0]
        assert set(trials.status) == {"ok"}


# ---------------------------------------------------------------- an interrupted driver

@pytest.mark.slow
def test_interrupt_and_resume(interrupted, tmp_path):
    suite, res, name, (rc, out, err, parquet), _ = interrupted
    run_dir = res / name
    # Nothing touched the run since (the corrupted-checkpoint case resumed a copy of it).
    assert {f: (run_dir / f).read_bytes() for f in parquet} == parquet
    # SIGINT: a clean stop, the resume command, and an exit code unlike a finished run's.
    assert rc == 130, (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("raycnn: interrupted; resume with: raycnn run "), err[-3000:]
    command = shlex.split(last.split("resume with: ", 1)[1])
    assert command[-3:] == ["--name", name, "--resume"] and str(suite) in command

    trials1, epochs1 = results.load_run(run_dir)
    done = set(trials1[trials1.status == "ok"].name)
    going = trials1[trials1.status == "running"]
    assert done and len(going) == 1, trials1[["name", "status", "epochs_done"]]
    cut = going.name.iloc[0]
    cut_epochs = int(going.epochs_done.iloc[0])
    assert 1 <= cut_epochs < int(going.epochs.iloc[0])

    # Resume, then stop that with SIGTERM once it has trained an epoch.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    argv = command[1:]                                   # as printed, minus the program name
    try:
        again = Background(*argv, env=cli_env(ray_tmp), logs=tmp_path / "run2")
        try:
            wait_for("an epoch of the resumed run", lambda: any(reported(ray_tmp).values()), timeout=900, proc=again)
            again.proc.send_signal(signal.SIGTERM)
            rc2, _, err2 = again.wait(timeout=300)
        finally:
            again.stop()
        assert rc2 == 130 and "interrupted; resume with:" in err2 and "Traceback" not in err2, err2[-3000:]
        trials2, epochs2 = results.load_run(run_dir)

        final = raycnn(*argv, env=cli_env(ray_tmp))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "done: results in" in final.stderr and "Traceback" not in final.stderr

    trials, epochs = results.load_run(run_dir)
    assert set(trials.status) == {"ok"} and len(trials) == 3
    for _, t in trials.iterrows():                      # every epoch exactly once
        assert list(epochs_of(epochs, t["name"]).epoch) == list(range(1, t.epochs + 1)), t["name"]
    assert not epochs.duplicated(["name", "repeat", "epoch"]).any()
    # Finished trials: untouched by both resumes.
    for name_ in done:
        pd.testing.assert_frame_equal(trials[trials.name == name_].reset_index(drop=True),
                                      trials1[trials1.name == name_].reset_index(drop=True))
        pd.testing.assert_frame_equal(epochs_of(epochs, name_), epochs_of(epochs1, name_))
    # The interrupted trial: its epochs before the cut kept, the rest from its checkpoint.
    mine, before = epochs_of(epochs, cut), epochs_of(epochs1, cut)
    pd.testing.assert_frame_equal(mine.iloc[:cut_epochs], before)
    assert not mine.resumed.iloc[:cut_epochs].any() and mine.resumed.iloc[cut_epochs:].all()
    # Whatever the second stop cut short went on from its checkpoint too; nothing ran twice.
    for name_ in set(trials2[trials2.status == "running"].name):
        assert mine_resumed_after(epochs, epochs2, name_)
    assert final.stderr.count("raycnn: warning:") == 0, final.stderr


def mine_resumed_after(epochs: pd.DataFrame, earlier: pd.DataFrame, name: str) -> bool:
    """The epochs of `name` that `earlier` had are kept; the later ones were resumed."""
    now, then = epochs_of(epochs, name), epochs_of(earlier, name)
    pd.testing.assert_frame_equal(now.iloc[:len(then)], then)
    return bool(now.resumed.iloc[len(then):].all())


# ---------------------------------------------------------------- a killed trial

@pytest.mark.slow
def test_killed_trial_restarts_from_its_checkpoint(tmp_path, ray_tmp):
    suite = tmp_path / "ft.toml"
    suite.write_text(FAULT_SUITE)
    res = tmp_path / "results"
    run = Background("run", suite, "--synthetic", "--filter", "ft/long", "--num-cpus", "1", "--results-dir", res,
                     "--name", "k", env=cli_env(ray_tmp, RAYCNN_PROGRESS_S="0"), logs=tmp_path / "logs")
    try:
        first = wait_for("the first epoch", lambda: [r for t in reported(ray_tmp).values() for r in t],
                         timeout=900, proc=run, every=0.2)
        pid = first[0]["pid"]
        # Tune registers epoch 1's checkpoint in a save task it runs before letting the trial go
        # on, so the kill waits for epoch 2 to be under way (its progress file, written every step
        # here): killed earlier, the trial would rightly restart from scratch.
        wait_for("epoch 2", lambda: any((epoch_progress.read(p) or {}).get("epoch") == 2
                                        for p in epoch_progress.folder(res / "k").glob("*.json")),
                 timeout=300, proc=run, every=0.02)
        os.kill(pid, signal.SIGKILL)             # the trial's worker, while it trains epoch 2
        rc, _, err = run.wait()
    finally:
        run.stop()
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err
    assert any(l.startswith("raycnn: warning: ft/long failed") and "restarting" in l for l in err.splitlines()), err
    trials, epochs = results.load_run(res / "k")
    row = trials.iloc[0]
    assert row.status == "ok" and row.failures == 1 and row.error == "" and "restarted" in row.warning, row.to_dict()
    mine = epochs_of(epochs, "ft/long")
    assert list(mine.epoch) == [1, 2, 3]                          # no gap, no duplicate
    assert list(mine.resumed) == [False, True, True]              # epoch 1 from the checkpoint
    (log,) = reported(ray_tmp).values()
    assert [r["epoch"] for r in log] == [1, 2, 3] and len({r["pid"] for r in log}) == 2


# ---------------------------------------------------------------- several nodes

@dataclass
class Cluster:
    address: str
    temp: Path          # the head's --temp-dir: the driver's staging copies of result.json are there
    mark: str           # NAME=VALUE in the environment of every process of this cluster


@pytest.fixture
def cluster(tmp_path):
    """A Ray head (1 CPU) and a second node (2 CPUs) on this machine, on loopback, started with
    `ray start`; yields the head's address. Their processes carry a unique environment
    variable, by which the teardown finds and stops exactly them (and what they started)."""
    temp = Path(tempfile.mkdtemp(prefix="rcc-", dir="/tmp"))
    mark = f"RAYCNN_TEST_CLUSTER={uuid.uuid4().hex}"
    env = {**os.environ, **BASE_ENV, mark.split("=")[0]: mark.split("=")[1]}
    ray = str(Path(PY).with_name("ray"))
    port, *agents = free_ports(3)
    common = ["--disable-usage-stats", "--node-ip-address=127.0.0.1", "--object-store-memory=300000000"]
    try:
        for args in (["--head", f"--port={port}", "--num-cpus=1", f"--temp-dir={temp}", "--include-dashboard=false",
                      f"--dashboard-agent-listen-port={agents[0]}"],
                     [f"--address=127.0.0.1:{port}", "--num-cpus=2", f"--dashboard-agent-listen-port={agents[1]}"]):
            out = subprocess.run([ray, "start", *args, *common], capture_output=True, text=True, env=env, timeout=300)
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        count = ("import ray, time\nray.init(address='127.0.0.1:%d', logging_level='ERROR', log_to_driver=False)\n"
                 "end = time.time() + 120\n"
                 "while sum(n['Alive'] for n in ray.nodes()) < 2 and time.time() < end: time.sleep(1)\n"
                 "print(sum(n['Alive'] for n in ray.nodes()))" % port)
        nodes = subprocess.run([PY, "-c", count], capture_output=True, text=True, env=env, timeout=300)
        assert nodes.stdout.strip().splitlines()[-1:] == ["2"], nodes.stdout + nodes.stderr[-2000:]
        yield Cluster(f"127.0.0.1:{port}", temp, mark)
    finally:
        stop_marked(mark)
        shutil.rmtree(temp, ignore_errors=True)


def marked(mark: str) -> list[int]:
    """Processes whose environment holds `mark` (this test's `ray start`s and their children)."""
    want, pids = mark.encode(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if want in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def stop_marked(mark: str, grace: float = 10) -> None:
    """SIGTERM the marked processes, then SIGKILL what is left after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in marked(mark):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.time() + grace
        while marked(mark) and time.time() < end:
            time.sleep(0.2)
    assert not marked(mark)


@pytest.mark.slow
def test_trials_spread_over_two_nodes(tmp_path, cluster):
    suite = tmp_path / "ft.toml"
    suite.write_text(FAULT_SUITE.replace("epochs = 1", "epochs = 2").replace("epochs = 3", "epochs = 2"))
    res = tmp_path / "results"
    out = raycnn("run", suite, "--synthetic", "--address", cluster.address, "--results-dir", res, "--name", "multi",
                 env={**os.environ, **BASE_ENV})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert [p.name for p in res.iterdir()] == ["multi"]            # one results folder for all nodes
    trials, epochs = results.load_run(res / "multi")
    assert len(trials) == 3 and set(trials.status) == {"ok"}
    assert trials.node.nunique() == 2, trials[["name", "node"]]    # "hostname/nodeid8" of both nodes
    assert set(epochs.node) == set(trials.node) and len(epochs) == 6
    for folder in (res / "multi" / "tune" / "experiment").glob("0*"):
        assert list(folder.glob("checkpoint_*/state.pt")), folder   # checkpoints from both nodes, here


def raylet_of_second_node(mark: str) -> tuple[int, str]:
    """(pid, node id) of the cluster's non-head raylet."""
    for pid in marked(mark):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if argv[0].endswith("raylet/raylet") and not any("__internal_head__" in a for a in argv):
            return pid, next(a.split("=", 1)[1] for a in argv if a.startswith("--node_id="))
    pytest.fail("no second raylet")


@pytest.mark.slow
def test_trials_survive_a_lost_node(tmp_path, cluster):
    """A worker node dies (a spot instance reclaimed): its trials restart from their last
    checkpoints on the node left, and the run ends with each epoch exactly once."""
    suite = tmp_path / "ft.toml"
    suite.write_text(FAULT_SUITE.replace("epochs = 1", "epochs = 3"))
    res = tmp_path / "results"
    raylet, node_id = raylet_of_second_node(cluster.mark)
    run = Background("run", suite, "--synthetic", "--address", cluster.address, "--results-dir", res,
                     "--name", "lost", env={**os.environ, **BASE_ENV}, logs=tmp_path / "logs")
    try:
        def on_second_node():
            going = [t for t in reported(cluster.temp).values()
                     if t and t[-1].get("node_id") == node_id and not t[-1].get("finished")]
            return going
        going = wait_for("an epoch of a trial on the second node", on_second_node, timeout=900, proc=run, every=0.2)
        os.kill(raylet, signal.SIGKILL)
        checkpointed = {folder for folder, t in reported(cluster.temp).items()
                        if t and t[-1].get("node_id") == node_id and not t[-1].get("finished")} if going else set()
        rc, _, err = run.wait()
    finally:
        run.stop()
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err
    trials, epochs = results.load_run(res / "lost")
    assert len(trials) == 3 and set(trials.status) == {"ok"}, trials[["name", "status", "error"]]
    for name in trials.name:
        assert list(epochs_of(epochs, name).epoch) == [1, 2, 3], name       # exactly `epochs` rows each
    restarted = trials[trials.failures > 0]
    assert len(restarted) >= 1, trials[["name", "node", "failures"]]
    assert not any(n.endswith(node_id[:8]) for n in trials.node)          # all ended on the head
    # A trial that had checkpointed an epoch there went on from it (one that had not starts over).
    names = {f.split("-", 1)[1].rsplit("-r", 1)[0].replace("-", "/") for f in checkpointed}
    assert names and names <= set(restarted.name), (names, restarted.name)
    for name in names:
        assert epochs_of(epochs, name).resumed.iloc[-1], name


@pytest.mark.slow
def test_the_drivers_local_node_dying(tmp_path, ray_tmp):
    """The private local instance dies under the driver: a few lines, the resume command, exit
    130; Ray's own output in RUN/ray.log; --resume then completes the run."""
    suite = tmp_path / "ft.toml"
    suite.write_text(FAULT_SUITE)
    res = tmp_path / "results"
    args = ("run", suite, "--synthetic", "--filter", "ft/long", "--num-cpus", "1", "--results-dir", res)
    run = Background(*args, "--name", "d", env=cli_env(ray_tmp), logs=tmp_path / "logs")
    try:
        wait_for("the first epoch", lambda: [r for t in reported(ray_tmp).values() for r in t],
                 timeout=900, proc=run, every=0.2)
        (raylet,) = [p for p in subprocess.run(["pgrep", "-f", f"raylet/raylet.*{ray_tmp}"], capture_output=True,
                                               text=True).stdout.split()]
        os.kill(int(raylet), signal.SIGKILL)
        rc, out, err = run.wait(timeout=300)
    finally:
        run.stop()
    lines = err.strip().splitlines()
    assert rc == 130, err[-3000:]
    assert len(lines) <= 5 and "Traceback" not in err, err[-3000:]
    assert "(raylet)" not in out + err and "Raylet is terminated" not in out + err, (out[-2000:], err[-2000:])
    assert any("the local Ray node died" in l for l in lines), err
    assert lines[-1].startswith("raycnn: interrupted; resume with: raycnn run") and lines[-1].endswith("--name d --resume")
    assert (res / "d" / "ray.log").stat().st_size > 0
    again = raycnn(*args, "--name", "d", "--resume", env=cli_env(ray_tmp))
    assert again.returncode == 0, again.stderr[-3000:]
    trials, epochs = results.load_run(res / "d")
    assert list(trials.status) == ["ok"] and list(epochs_of(epochs, "ft/long").epoch) == [1, 2, 3]


# ---------------------------------------------------------------- results after faults (no Ray run)

def test_results_keep_the_lineage_that_went_on(tmp_path):
    """collect() on hand-made Tune folders: re-reported epochs, restarts and Tune's statuses."""
    from raycnn import experiment
    exp = experiment.experiment_dir(tmp_path)
    meta = {"name": "x", "suite": "s", "table": "t", "row": "r", "column": "c", "order": 0, "report_acc": 0.5,
            "repeat": 0, "git_rev": "g", "torch_version": "1", "torchvision_version": "1", "ray_version": "1",
            "python_version": "3", "gpus": 0.0, "cpus": 1, "config": {"epochs": 3}}

    def trial(folder: str, epochs: list[tuple[int, bool]], error: str = "", finished_at: int = 3) -> None:
        path = exp / folder
        path.mkdir(parents=True)
        (path / "params.json").write_text(json.dumps({"trial": {**meta, "name": folder}}))
        lines = [json.dumps({"epoch": e, "test_acc": 0.1 * e, "resumed": resumed, "status": "ok" if e == finished_at else "running",
                             "finished": e == finished_at, "images_per_s": 1.0}) for e, resumed in epochs]
        (path / "result.json").write_text("\n".join(lines) + "\n")
        if error:
            (path / "error.txt").write_text(f"Failure # 1 (occurred at now)\n{error}\n")

    trial("killed", [(1, False), (2, False), (2, True), (3, True)], error="The actor is dead. Worker exit type: X")
    trial("over", [(1, False), (2, False), (1, False)], error="boom")       # started over, then stopped
    trial("failed", [(1, False)], error="ValueError: bad")
    trial("cut", [(1, False), (2, True)])
    with open(exp / "cut" / "result.json", "a") as f:
        f.write('{"epoch": 3, "te')                       # the driver died mid-line
    state = {"trial_data": [[json.dumps({"relative_logdir": n, "status": s}), "{}"]
                            for n, s in (("killed", "TERMINATED"), ("over", "PAUSED"), ("failed", "ERROR"),
                                         ("cut", "RUNNING"))]}
    (exp / "experiment_state-2026.json").write_text(json.dumps(state))

    rows, epochs = experiment.collect(tmp_path)
    by = {r["name"]: r for r in rows}
    ep = lambda n: [(e["epoch"], e["resumed"]) for e in epochs if e["name"] == n]
    assert ep("killed") == [(1, False), (2, True), (3, True)]
    assert by["killed"]["status"] == "ok" and by["killed"]["error"] == "" and by["killed"]["failures"] == 1
    assert by["killed"]["warning"] == "restarted after 1 failure(s), the last: The actor is dead."
    assert ep("over") == [(1, False)]                     # the earlier run's epoch 2 is not this lineage's
    assert by["over"]["status"] == "running"              # failed, restarted, interrupted: resumable
    assert by["failed"]["status"] == "error" and by["failed"]["error"] == "ValueError: bad"
    assert ep("cut") == [(1, False), (2, True)] and by["cut"]["status"] == "running"   # a torn last line
