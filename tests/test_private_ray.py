"""A private run's Ray is its driver's alone: every socket of the run's processes listens on
loopback only, its GCS refuses a caller without the run's token (or with a wrong one), and the
token is made for the run and passed through the environment, never written to ~/.ray.

Tried as an outsider would, against a real `raycnn run` in progress (slow: a real Ray)."""
from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time

import grpc
import psutil
import pytest

from raycnn import epoch_progress

pytestmark = pytest.mark.slow

SUITE = """
[suite]
name = "sec"
cpus_per_trial = 1

[defaults]
model = "mnist_base"
synthetic = true
max_train_samples = 4096
epochs = 50

[[trials]]
name = "long"
"""


@pytest.fixture
def private_run(tmp_path, ray_tmp):
    """A `raycnn run` in progress with a trial training (its progress file exists); yields the
    driver's psutil.Process and the HOME it runs with; stopped by its pid afterwards."""
    suite = tmp_path / "sec.toml"
    suite.write_text(SUITE)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(ray_tmp),
               RAYCNN_PROGRESS_S="0.2")
    run_dir = tmp_path / "runs" / "r"
    with open(tmp_path / "out", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "raycnn.cli", "run", str(suite), "--results-dir",
                                 str(tmp_path / "runs"), "--name", "r", "--num-cpus", "1"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while not epoch_progress.folder(run_dir).files("*.json"):
            assert proc.poll() is None, (tmp_path / "out").read_text()
            assert time.monotonic() < deadline, "no trial started within 240 s"
            time.sleep(0.5)
        yield psutil.Process(proc.pid), home
    finally:
        proc.send_signal(signal.SIGINT)      # the driver shuts its Ray down
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _listening(driver: psutil.Process) -> list[tuple[str, str, int]]:
    """(process name, ip, port) of every TCP socket the driver and its descendants listen on."""
    out = []
    for p in [driver, *driver.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="tcp")
            name = p.name()
        except psutil.NoSuchProcess:
            continue
        out += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def _gcs(driver: psutil.Process) -> tuple[int, str]:
    """The private GCS's port, and the token it was started with (its environment)."""
    gcs = [p for p in driver.children(recursive=True) if p.name() == "gcs_server"]
    assert len(gcs) == 1, [p.name() for p in driver.children(recursive=True)]
    ports = [c.laddr.port for c in gcs[0].net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    assert ports
    return ports[0], gcs[0].environ()["RAY_AUTH_TOKEN"]


def _cluster_id_call(port: int, token: str | None) -> grpc.StatusCode:
    """The status of the GCS's GetClusterId, the first call every Ray client makes."""
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    metadata = [("authorization", f"Bearer {token}")] if token is not None else []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), metadata=metadata, timeout=10)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_every_socket_of_a_private_run_listens_on_loopback_only(private_run):
    driver, _ = private_run
    sockets = _listening(driver)
    assert {name for name, _, _ in sockets} >= {"gcs_server", "raylet"}, sockets
    beyond = [s for s in sockets if not _loopback(s[1])]
    assert not beyond, f"listening beyond loopback: {beyond}"


def test_a_trial_starts_with_one_malloc_arena(private_run):
    """The trial's process starts with raycnn.memory.TRIAL_ENV (Ray's runtime environment of the
    run), so the thread that trains allocates from the heap keep_freed_memory governs."""
    driver, _ = private_run
    trials = [p for p in driver.children(recursive=True) if "ImplicitFunc" in " ".join(p.cmdline())]
    assert trials, [p.cmdline()[:1] for p in driver.children(recursive=True)]
    assert all(p.environ().get("MALLOC_ARENA_MAX") == "1" for p in trials)
    assert "MALLOC_ARENA_MAX" not in driver.environ()       # the run's trials only, not its driver


def test_the_gcs_refuses_callers_without_the_runs_token(private_run, tmp_path):
    driver, home = private_run
    port, token = _gcs(driver)          # the run's own token, in its processes' environment only
    assert len(token) >= 32
    assert _cluster_id_call(port, None) == grpc.StatusCode.UNAUTHENTICATED
    assert _cluster_id_call(port, "0" * 64) == grpc.StatusCode.UNAUTHENTICATED
    assert _cluster_id_call(port, token) == grpc.StatusCode.OK        # the same call, with the token
    assert not (home / ".ray").exists(), "the token was written to ~/.ray"

    # A whole Ray client, as a stranger on this machine would start one (dialling loopback).
    stranger = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    stranger.update(HOME=str(tmp_path / "stranger"), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                    RAY_USAGE_STATS_ENABLED="0")
    code = ("import ray\n"
            f"ray.init(address='127.0.0.1:{port}', log_to_driver=False)\n"
            "print('CONNECTED', ray.cluster_resources())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=stranger, timeout=180)
    assert "CONNECTED" not in done.stdout
    assert done.returncode != 0
    assert "AuthenticationError" in done.stderr or "Unauthenticated" in done.stderr, done.stderr[-2000:]
