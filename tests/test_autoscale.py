"""Autoscaling from zero, on Ray's autoscaler simulator (the `fake_multinode` node provider).

The cluster is shaped like cluster.yaml: a head with no CPUs (the driver's node, never trials)
and one GPU worker type with min_workers 0, so before the run no node can hold a trial. The
trials must still be submitted, the autoscaler must start workers for them, and every trial
must finish on a worker, its rows in the one results folder.

Logical GPUs work on a CPU machine. Ray's AutoscalingCluster helper is not used: its start and
shutdown run `ray stop --force`, which would stop every Ray on the machine. The test starts the
head with `ray start` under a private --temp-dir and an environment mark that every process
it spawns (the autoscaler's simulated nodes included) inherits, and stops exactly those.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from raycnn import results
from support import BASE_ENV, PY, free_ports, raycnn, stop_marked

WORKER = {"CPU": 2, "GPU": 1}

SUITE = """
[suite]
name = "as"
cpus_per_trial = 1
gpus_per_trial = 0.5

[defaults]
model = "mnist_base"
epochs = 2
max_train_samples = 256
eval_batch_size = 2000

[[trials]]
name = "a"

[[trials]]
name = "b"

[[trials]]
name = "c"
"""


def simulator_config(port: int) -> dict:
    """An autoscaler config for the fake_multinode provider (the wheel ships no example.yaml)."""
    return {
        "cluster_name": "raycnn-test",
        "max_workers": 2,
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{port}",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "ray.worker.gpu": {"resources": {**WORKER, "object_store_memory": 200_000_000},
                               "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "auth": {"ssh_user": "nobody"},
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                           "cluster_synced_files")},
        "file_mounts": {},
    }


def nodes(address: str, env: dict) -> list[dict]:
    """Every node the cluster has known (alive or not): id, resources, alive."""
    code = ("import json, ray\n"
            f"ray.init(address='{address}', logging_level='ERROR', log_to_driver=False)\n"
            "print(json.dumps([{'id': n['NodeID'], 'resources': n['Resources'], 'alive': n['Alive']}"
            " for n in ray.nodes()]))")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def simulator(tmp_path):
    """The simulated cluster's head address and environment; every process it started is
    stopped afterwards, whatever the test did."""
    temp = Path(tempfile.mkdtemp(prefix="rca-", dir="/tmp"))     # Ray's socket paths stay short
    mark = ("RAYCNN_TEST_CLUSTER", uuid.uuid4().hex)
    env = {**os.environ, **BASE_ENV, mark[0]: mark[1]}
    port, agent = free_ports(2)
    config = tmp_path / "autoscaler.yaml"
    config.write_text(yaml.safe_dump(simulator_config(port)))
    try:
        out = subprocess.run(
            [str(Path(PY).with_name("ray")), "start", "--head", f"--port={port}", "--num-cpus=0",
             f"--autoscaling-config={config}", f"--temp-dir={temp}", "--include-dashboard=false",
             f"--dashboard-agent-listen-port={agent}", "--node-ip-address=127.0.0.1",
             "--object-store-memory=200000000", "--disable-usage-stats"],
            capture_output=True, text=True, timeout=300,
            env={**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        yield f"127.0.0.1:{port}", env, temp
    finally:
        stop_marked("=".join(mark))
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_workers_start_from_zero_for_the_trials(tmp_path, simulator):
    address, env, temp = simulator
    before = nodes(address, env)
    assert [n["resources"].get("CPU", 0) for n in before if n["alive"]] == [0]   # the head alone
    suite = tmp_path / "as.toml"
    suite.write_text(SUITE)
    res = tmp_path / "results"

    # Workers start from zero, so the trials wait: the live view must say so (after 1 s here, not 30).
    out = raycnn("run", suite, "--synthetic", "--address", address, "--results-dir", res, "--name", "auto",
                 env={**env, "RAYCNN_WAIT_NOTICE_S": "1"})

    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "more than any node" not in out.stderr
    waiting = [l for l in out.stderr.splitlines() if "waiting for resources" in l]
    assert waiting and "each needs 1 CPU + 0.5 GPU" in waiting[0], out.stderr[-3000:]
    assert [p.name for p in res.iterdir()] == ["auto"]                # one results folder
    trials, epochs = results.load_run(res / "auto")
    assert len(trials) == 3 and set(trials.status) == {"ok"} and len(epochs) == 6
    workers = {n["id"] for n in nodes(address, env) if n["resources"].get("GPU", 0) == WORKER["GPU"]}
    assert 1 <= len(workers) <= 2, workers                            # started by the autoscaler
    ran_on = set()
    for log in (res / "auto" / "tune" / "experiment").glob("0*/result.json"):
        ran_on |= {json.loads(line)["node_id"] for line in log.read_text().splitlines() if line.strip()}
    assert ran_on and ran_on <= workers, (ran_on, workers)            # none on the head
    assert set(trials.gpus_per_trial) == {0.5}


def test_placement_counts_the_node_types_the_autoscaler_can_start(tmp_path):
    """Ray-free half of placement: the autoscaler config's worker types, and a request that no
    node type can hold fails in one line."""
    from raycnn import cluster
    from raycnn.errors import RunError
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(simulator_config(1)))
    types = cluster.types_in(path)
    assert types == [{"CPU": 2.0, "GPU": 1.0}]
    head = {"CPU": 0.0}
    entry = {"cpus": 1, "gpus": 0.5, "config": {}}
    with pytest.raises(RunError, match="--cpus-per-trial 1 is more than any node has"):
        cluster.place([entry], [head])                      # alive now: the head
    placed = cluster.place([entry], [head, *types])         # what the autoscaler can add
    assert (placed[0]["cpus"], placed[0]["gpus"]) == (1, 0.5) and placed[0] is not entry
    with pytest.raises(RunError, match="--cpus-per-trial 3 is more than any node has"):
        cluster.place([entry | {"cpus": 3}], [head, *types])
    with pytest.raises(RunError, match="--gpus-per-trial 2 is more than any node has"):
        cluster.place([entry], [head, *types], gpus_option=2)
    assert cluster.place([entry], [{"CPU": 2.0}])[0]["gpus"] == 0.0    # no GPUs anywhere: none asked
