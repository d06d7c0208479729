"""Joining a Ray cluster (or starting a private one) and fitting trials to its node shapes.

Placement checks each trial's request against the nodes the cluster **can** have: the nodes
alive now plus the node types its autoscaler may start. A request that fits one of them is
submitted (Tune's pending trials are what makes the autoscaler add workers); one that fits none
fails in one line before any trial starts. So does a results folder that some node alive now
cannot reach (`probe`).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
from contextlib import contextmanager
from pathlib import Path

import ray
import yaml

from raycnn import memory, storage
from raycnn.errors import RunError

Shape = dict[str, float]     # a node's resources, e.g. {"CPU": 8, "GPU": 1}


def connect(address: str | None, num_cpus: int | None = None, num_gpus: float | None = None) -> dict:
    """Join the cluster at `address`, or start a private local instance (with `num_cpus` and
    `num_gpus`) that only this process can use; returns what `disconnect` restores.

    A private instance binds every server to loopback and requires a token made for this run;
    a cluster is joined with the user's own settings (RAY_AUTH_MODE, RAY_AUTH_TOKEN, ...). Either
    way the run's trial processes start with `memory.trial_env()` (Ray's runtime environment)."""
    logging.getLogger("ray").setLevel(logging.ERROR)
    env = memory.trial_env()
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                  runtime_env={"env_vars": env} if env else None)
    saved = {k: os.environ.get(k) for k in AUTH_ENV}
    try:
        if address:
            check_reachable(address)
            _init(f"cannot join the Ray cluster at {address}", address=address, **kwargs)
        else:
            private_auth()
            with loopback():
                _init("cannot start a local Ray instance", address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                      **kwargs)
            check_loopback(ray.get_runtime_context().gcs_address)
    except BaseException:
        disconnect(saved)
        raise
    # Tune logs each failed trial with its traceback; raycnn says it in one line instead, and
    # the traceback stays in the trial's error.txt.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    return saved


def disconnect(saved: dict) -> None:
    """Shut Ray down and restore the authentication settings `connect` found."""
    ray.shutdown()
    _restore_auth(saved)


def _init(failure: str, **kwargs) -> None:
    try:
        ray.init(**kwargs)
    except Exception as e:   # ray raises several types here; all mean the same to the user
        raise RunError(f"{failure}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


# Ray's token authentication reads these from the environment; the processes Ray starts inherit them.
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def private_auth() -> None:
    """Token auth with a fresh random token, in this process's environment only: the private
    instance's GCS, raylet and workers inherit it, and nothing is written to ~/.ray (where
    Ray would otherwise save a token of its own). `disconnect` restores the user's settings."""
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    _reload_auth()


def _restore_auth(saved: dict) -> None:
    if all(os.environ.get(k) == v for k, v in saved.items()):
        return
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _reload_auth()


def _reload_auth() -> None:
    """Make this process see the environment's auth settings now: Ray reads them into its
    config at import and caches the token (the same refresh Ray does when it turns auth on)."""
    from ray._raylet import AuthenticationTokenLoader, Config
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextmanager
def loopback():
    """Ray's single-machine mode while the private instance starts: its node address is
    loopback, so its GCS, raylet, workers and agents listen on 127.0.0.1 only. (Ray picks the
    mode from an environment variable at import; its child processes must not inherit it,
    since `ray start --address` refuses to run under it.)"""
    from ray._private import ray_constants
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def check_loopback(gcs_address: str) -> None:
    """Refuse to go on with a private instance that listens beyond loopback."""
    host = gcs_address.rsplit(":", 1)[0].strip("[]")
    if not ipaddress.ip_address(host).is_loopback:
        raise RunError(f"the private Ray instance did not bind to loopback (its GCS is at {gcs_address}); not running")


# An HTTP/2 client connection preface with an empty SETTINGS frame (RFC 9113, 3.4 and 6.5).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast, in one line, on a HOST:PORT that is not a Ray cluster (ray.init, and Ray's own
    GCS client, retry for a minute or more there, printing C++ warnings). Ray's GCS speaks gRPC,
    i.e. HTTP/2: its first bytes back are a SETTINGS frame (type 4 in the 4th byte)."""
    if address == "auto" or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=3) as conn:
            conn.settimeout(timeout)
            conn.sendall(H2_PREFACE)
            head = conn.recv(9, socket.MSG_WAITALL)
    except (OSError, ValueError) as e:
        if isinstance(e, (ConnectionRefusedError, ValueError, socket.gaierror)):
            raise RunError(f"cannot reach a Ray cluster at {address}") from None
        head = b""      # a timeout or a reset: something answers, not as Ray
    if len(head) < 9 or head[3] != 4:
        raise RunError(f"{address} answers, but not as a Ray cluster (no Ray GCS there: is it the head's --port?)")


# ---------------------------------------------------------------- what the cluster can have

def shapes() -> list[Shape]:
    """The resources of every node the cluster has now or its autoscaler may start."""
    alive = [{k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")}
             for n in ray.nodes() if n.get("Alive")]
    return alive + autoscaler_types()


def autoscaler_types() -> list[Shape]:
    """The worker types the cluster's autoscaler may start (max_workers > 0); [] without one.

    Autoscaler v2 publishes its config in the GCS. The v1 autoscaler (Ray's default, and what
    `ray up` runs) publishes none, but runs on the head as `monitor.py --autoscaling-config=FILE`:
    a driver on the head (as docs/cluster.md runs it) reads that FILE."""
    from ray._private.state import state     # Ray's own reader of the GCS cluster config
    try:
        config = state.get_cluster_config()
    except Exception:
        config = None
    if config is not None and config.node_group_configs:
        return [{k: float(v) for k, v in g.resources.items() if k in ("CPU", "GPU")}
                for g in config.node_group_configs if g.max_count != 0]
    if os.environ.get("RAY_CLUSTER_NAME") and os.environ.get("KUBERNETES_SERVICE_HOST"):
        return kuberay_types(os.environ["RAY_CLUSTER_NAME"])
    path = monitor_config(ray.get_runtime_context().gcs_address)
    return types_in(path) if path else []


# The namespace of the pod, as Kubernetes projects it into every container with its token.
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def kuberay_types(cluster_name: str) -> list[Shape]:
    """On KubeRay (which sets RAY_CLUSTER_NAME in every Ray container): the worker groups of the
    RayCluster object, read through Ray's own reader, the one KubeRay's autoscaler sidecar uses,
    with the head pod's service account (KubeRay lets it read its RayCluster). So a worker
    group may start from zero pods: its shape is known before its first pod exists. [] where
    the object cannot be read (the nodes alive are then all raycnn knows)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import AutoscalingConfigProducer
    try:
        namespace = Path(NAMESPACE_FILE).read_text().strip()
        config = AutoscalingConfigProducer(cluster_name, namespace)()
    except Exception as e:    # requests' errors, a missing token, an unexpected object: all mean "unknown"
        logging.getLogger("raycnn").warning("cannot read the RayCluster %s's worker groups: %s", cluster_name, e)
        return []
    return types_in(config)


def monitor_config(gcs_address: str) -> Path | None:
    """The --autoscaling-config of the autoscaler serving `gcs_address`, if it runs on this host."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("autoscaler/_private/monitor.py") for a in argv):
            continue
        opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        if opts.get("autoscaling-config") and _same_port(opts.get("gcs-address", ""), gcs_address):
            return Path(opts["autoscaling-config"]).expanduser()
    return None


def _same_port(a: str, b: str) -> bool:
    # The monitor names the head by its node IP, a driver may name it 127.0.0.1: one host, one port.
    return a.rsplit(":", 1)[-1] == b.rsplit(":", 1)[-1] != ""


def types_in(source: Path | dict) -> list[Shape]:
    """The worker node types of an autoscaler config (cluster.yaml's layout): a file, or the
    config itself."""
    try:
        config = source if isinstance(source, dict) else yaml.safe_load(Path(source).read_text())
        types = config["available_node_types"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return []
    cap = config.get("max_workers", 1)
    return [{k: float(v) for k, v in t.get("resources", {}).items() if k in ("CPU", "GPU")}
            for name, t in types.items()
            if name != config.get("head_node_type") and min(t.get("max_workers", cap), cap) > 0]


# ---------------------------------------------------------------- placement

def place(entries: list[dict], nodes: list[Shape], gpus_option: float | None = None) -> list[dict]:
    """The plan's entries with the GPU share each is granted on a cluster of these node shapes
    (none where the cluster has no GPUs, at most the largest node's); RunError where no shape
    can ever hold a trial's request, or `gpus_option` (--gpus-per-trial) asks more than any has."""
    max_gpus = max((n.get("GPU", 0) for n in nodes), default=0)
    if gpus_option is not None and gpus_option > max_gpus:
        raise RunError(f"--gpus-per-trial {gpus_option:g} is more than any node has (largest: {max_gpus:g} GPUs)")
    out = []
    for e in entries:
        # A GPU share only where GPUs exist: on a CPU-only cluster the suite's share would never schedule.
        placed = e | {"gpus": min(e["gpus"], max_gpus)}
        if not any(fits({"CPU": placed["cpus"], "GPU": placed["gpus"]}, n) for n in nodes):
            largest = max((n.get("CPU", 0) for n in nodes if n.get("GPU", 0) >= placed["gpus"]), default=0)
            raise RunError(f"--cpus-per-trial {placed['cpus']} is more than any node has "
                           f"(largest: {largest:g} CPUs{' with a GPU' if placed['gpus'] else ''})")
        out.append(placed)
    return out


def fits(request: Shape, node: Shape) -> bool:
    """Whether a node of this shape can hold the request."""
    return all(node.get(k, 0) >= v for k, v in request.items() if v)


# ---------------------------------------------------------------- can every node reach the results?

PROBE_TIMEOUT_S = 300     # a node's first task starts a worker process: slow on a busy machine


def probe(run_dir: storage.Place, timeout: float = PROBE_TIMEOUT_S) -> None:
    """RunError in one line, before any trial starts, naming a node alive now that cannot see the
    run folder or write in it (a local path that is not the shared mount there, a bucket its
    credentials may not write). The driver writes a probe file into the folder; a task pinned to
    each node reads it and writes and removes one of its own (`raycnn.storage.probe`). Nodes the
    autoscaler adds later are not probed: Tune fails their trials instead."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    token = secrets.token_hex(8)
    mark = run_dir / f".probe-{token}"
    mark.write_bytes(token.encode(), durable=False)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(num_cpus=0, max_retries=0)(storage.probe)
    try:
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(run_dir, token, n["NodeID"][:8]) for n in nodes]
        try:
            answers = ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise RunError(f"--results-dir {run_dir}: not every node answered within {timeout:g} s whether it "
                           f"can write there") from None
        except ray.exceptions.RayError as e:
            raise RunError(f"--results-dir {run_dir}: a node could not check it: {storage.first_line(e)}") from None
    finally:
        mark.unlink()
    for node, problem in zip(nodes, answers):
        if problem:
            raise RunError(f"--results-dir {run_dir}: node {node.get('NodeManagerHostname', '?')}/{node['NodeID'][:8]} "
                           f"{problem}; every node must reach it: a bucket, or a filesystem mounted at the same path "
                           f"on each")
