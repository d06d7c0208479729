"""Helpers shared by the tests that run `raycnn` as a user does (in a subprocess) and by those
that start Ray clusters on this machine: environments, runners, waiting, process marks.

Every Ray started here lives under a private RAY_TMPDIR (or --temp-dir) and is stopped by the
process ids it started: never `ray stop`, which would stop every Ray on the machine.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

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
    try:
        paths = sorted(ray_root.glob("**/driver_artifacts/*/result.json"))
    except FileNotFoundError:
        return {}     # Ray removed a folder (spilled objects, a worker's) while glob walked it: poll again
    for path in paths:
        lines = []
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue          # its session ended between glob and read
        for line in text.splitlines():
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




# ---------------------------------------------------------------- an S3 server on loopback

@dataclass
class S3:
    """moto's S3 server on a loopback port: the environment a client needs (the standard AWS
    variables, no file written) and an admin filesystem for the test's own set-up."""
    env: dict
    port: int

    def admin(self):
        import pyarrow.fs as pafs
        return pafs.S3FileSystem(endpoint_override=self.env["AWS_ENDPOINT_URL"], access_key=self.env["AWS_ACCESS_KEY_ID"],
                                 secret_key=self.env["AWS_SECRET_ACCESS_KEY"], region=self.env["AWS_DEFAULT_REGION"],
                                 allow_bucket_creation=True)


def s3_env(port: int, key: str = "testing", secret: str = "testing") -> dict:
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextmanager
def s3_server(**server_env):
    """moto's server mode as a subprocess on a free loopback port (a real S3 API over HTTP, no
    in-process mocking), stopped by its pid."""
    port = free_ports(1)[0]
    proc = subprocess.Popen([PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **server_env})
    try:
        end = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < end, "moto's S3 server did not start"
                time.sleep(0.2)
        yield S3(s3_env(port), port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- two Ray nodes on loopback

@dataclass
class Cluster:
    address: str
    temp: Path          # the head's --temp-dir: the driver's staging copies of result.json are there
    mark: str           # NAME=VALUE in the environment of every process of this cluster


@contextmanager
def two_nodes(head_env: dict | None = None, worker_env: dict | None = None, worker_prefix: tuple = (),
              worker_cpus: int = 2):
    """A Ray head (1 CPU) and a second node (`worker_cpus` CPUs) on this machine, on loopback, started with
    `ray start` (the second under `worker_prefix`, e.g. in its own mount namespace); yields the
    Cluster. Their processes carry a unique environment variable, by which the teardown finds and
    stops exactly them (and what they started)."""
    temp = Path(tempfile.mkdtemp(prefix="rcc-", dir="/tmp"))
    mark = f"RAYCNN_TEST_CLUSTER={uuid.uuid4().hex}"
    env = {**os.environ, **BASE_ENV, mark.split("=")[0]: mark.split("=")[1]}
    ray = str(Path(PY).with_name("ray"))
    port, *agents = free_ports(3)
    common = ["--disable-usage-stats", "--node-ip-address=127.0.0.1", "--object-store-memory=300000000"]
    try:
        for prefix, extra, args in (
                ((), head_env or {}, ["--head", f"--port={port}", "--num-cpus=1", f"--temp-dir={temp}",
                                      "--include-dashboard=false", f"--dashboard-agent-listen-port={agents[0]}"]),
                (worker_prefix, worker_env or {}, [f"--address=127.0.0.1:{port}", f"--num-cpus={worker_cpus}",
                                                   f"--dashboard-agent-listen-port={agents[1]}"])):
            out = subprocess.run([*prefix, ray, "start", *args, *common], capture_output=True, text=True,
                                 env={**env, **extra}, timeout=300)
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
