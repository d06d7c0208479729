"""k8s/rayjob.yaml and the Dockerfile, checked offline (no cluster, no Docker engine).

The manifest is validated against KubeRay's RayJob schema (k8s/schema/rayjob-v1.json, from the
CRD: unknown fields and wrong types fail, as under `kubectl apply`), then for what the schema
cannot say: KubeRay's own cross-field rules that the manifest touches, and this project's
expectations (packing, a head without trials, scaling from zero, secrets, the Ray version).
"""
from __future__ import annotations

import copy
import http.server
import ipaddress
import json
import os
import re
import shlex
import ssl
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "k8s" / "rayjob.yaml"
SCHEMA = REPO / "k8s" / "schema" / "rayjob-v1.json"
DOCKERFILE = REPO / "Dockerfile"

SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)


@pytest.fixture
def job() -> dict:
    with open(MANIFEST) as f:            # as kubectl reads it: one document, anchors resolved
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def cluster(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]


def gpu_group(job: dict) -> dict:
    groups = [g for g in cluster(job)["workerGroupSpecs"] if float(g["rayStartParams"].get("num-gpus", 0)) >= 1]
    assert len(groups) == 1, f"expected one GPU worker group, got {[g['groupName'] for g in groups]}"
    return groups[0]


def pods(job: dict) -> dict[str, dict]:
    """Every pod spec of the manifest, by group."""
    spec = cluster(job)
    return {"head": spec["headGroupSpec"]["template"]["spec"],
            **{g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]}}


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def quantity(q: str | int | float) -> float:
    """A Kubernetes CPU or count quantity: "8", 8, "7500m"."""
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def ray_version() -> str:
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().split()
                if "==" in line and not line.startswith("#"))
    return pins["ray"]


# ---------------------------------------------------------------- the schema

def test_manifest_matches_kuberay_schema(job, validator):
    errors = sorted(validator.iter_errors(job), key=lambda e: e.json_path)
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")


def _worker(j):
    return gpu_group(j)


def _worker_container(j):
    return gpu_group(j)["template"]["spec"]["containers"][0]


BROKEN = {
    "misspelled RayJob field": lambda j: j["spec"].__setitem__("shutdownAfterJobFinish", True),
    "misspelled worker-group field": lambda j: _worker(j).__setitem__("minReplica", 0),
    "replicas as a string": lambda j: _worker(j).__setitem__("replicas", "1"),
    "rayStartParams value not a string": lambda j: _worker(j)["rayStartParams"].__setitem__("num-gpus", 1),
    "unknown container field": lambda j: _worker_container(j).__setitem__("envs", []),
    "secretKeyRef without its key": lambda j: _worker_container(j)["env"][0]["valueFrom"]["secretKeyRef"].pop("key"),
    "unknown auth mode": lambda j: cluster(j)["authOptions"].__setitem__("mode", "password"),
    "worker group without a name": lambda j: _worker(j).pop("groupName"),
    "a volume of an unknown kind": lambda j: _worker(j)["template"]["spec"]["volumes"][0].__setitem__("emptydir", {}),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_schema_rejects_a_broken_copy(job, validator, case):
    validator.validate(job)                       # the original passes ...
    broken = copy.deepcopy(job)
    BROKEN[case](broken)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)               # ... the broken copy does not


def test_kuberay_rules_beyond_the_schema(job):
    """Checks KubeRay's webhook/controller makes (ray-operator/controllers/ray/utils/validation.go)
    on fields this manifest sets."""
    spec = cluster(job)
    # authOptions.mode token needs rayVersion >= 2.52.0.
    assert spec["authOptions"]["mode"] == "token"
    assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)
    # ttlSecondsAfterFinished only acts with shutdownAfterJobFinishes.
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
    for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        # Resources in rayStartParams and in the group's `resources` together are refused.
        assert not g.get("resources"), "use rayStartParams or resources, not both"
        assert "labels" not in g["rayStartParams"]
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]


# ---------------------------------------------------------------- the cluster's shape

def test_head_takes_no_trials(job):
    head = cluster(job)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert float(head["rayStartParams"].get("num-gpus", 0)) == 0
    for c in containers(head["template"]["spec"]):
        asked = {**c["resources"].get("requests", {}), **c["resources"].get("limits", {})}
        assert not [k for k in asked if "gpu" in k], f"{c['name']} asks for a GPU: {asked}"


def worker_shape(job: dict) -> dict[str, float]:
    """The Ray resources of one GPU worker pod, as its rayStartParams declare them; the
    container's limits must give the pod the same CPUs and GPUs."""
    group = gpu_group(job)
    shape = {"CPU": float(group["rayStartParams"]["num-cpus"]), "GPU": float(group["rayStartParams"]["num-gpus"])}
    (ray,) = group["template"]["spec"]["containers"]
    limits = ray["resources"]["limits"]
    assert quantity(limits["cpu"]) == shape["CPU"], "Ray would hand out CPUs the pod may not use"
    assert quantity(limits["nvidia.com/gpu"]) == shape["GPU"]
    return shape


def test_worker_group_scales_from_zero(job):
    spec = cluster(job)
    assert spec["enableInTreeAutoscaling"] is True
    group = gpu_group(job)
    assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0 and group["maxReplicas"] >= 1


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key: the loopback API server's, and the client's."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


@contextmanager
def api_server(objects: dict[str, dict], cert: Path, key: Path):
    """An HTTPS server on loopback answering GETs of `objects` (by URL path) as the Kubernetes API
    does; yields (port, the paths asked for)."""
    asked = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            body = json.dumps(objects[self.path]).encode() if self.path in objects else b"{}"
            self.send_response(200 if self.path in objects else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], asked
    finally:
        server.shutdown()
        server.server_close()


def test_the_gpu_group_is_read_from_the_raycluster_before_its_first_pod(job, tmp_path):
    """With no worker pod yet, the driver reads the GPU group's shape from the RayCluster object
    (Ray's own KubeRay reader, over HTTPS, as in a pod of the cluster), so the trials get their
    GPU share and wait for the autoscaler instead of being placed on CPUs alone."""
    from raycnn.cluster import place
    cert, key = _self_signed(tmp_path)
    (tmp_path / "namespace").write_text("ml\n")
    name = "raycnn-mnist-abcde"           # KubeRay names the RayJob's cluster after the job
    raycluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": name, "namespace": "ml"},
                  "spec": cluster(job)}
    with api_server({f"/apis/ray.io/v1/namespaces/ml/rayclusters/{name}": raycluster}, cert, key) as (port, asked):
        # As a pod of the cluster sees it: the API server's address, RAY_CLUSTER_NAME (KubeRay
        # sets it), credentials (a client certificate here, the service account's token there).
        env = {**os.environ, "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
               "RAY_CLUSTER_NAME": name, "RAY_KUBERAY_CA_CERT_PATH": str(cert),
               "RAY_KUBERAY_CLIENT_CERT_PATH": str(cert), "RAY_KUBERAY_CLIENT_KEY_PATH": str(key)}
        code = (f"import json; from raycnn import cluster; cluster.NAMESPACE_FILE = {str(tmp_path / 'namespace')!r}; "
                f"print(json.dumps(cluster.kuberay_types({name!r})))")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    types = json.loads(out.stdout)
    assert types == [worker_shape(job)] and asked == [f"/apis/ray.io/v1/namespaces/ml/rayclusters/{name}"]
    head = {"CPU": 0.0}
    [placed] = place([{"cpus": 1, "gpus": 0.125, "config": {}}], [head] + types)
    assert placed["gpus"] == 0.125          # a GPU share, though no GPU pod is alive yet


def test_every_bundled_suite_packs_onto_the_gpu_worker(job):
    """Each trial fits one worker pod, and the trials that share its GPU (1 / gpus_per_trial of
    them) also get their CPUs there: 8 MNIST trials at 1 CPU + 0.125 GPU on one pod."""
    from raycnn import suites
    from raycnn.cluster import fits, types_in
    shape = worker_shape(job)
    assert types_in(REPO / "cluster.yaml") == [shape], "the same worker shape as cluster.yaml's"
    checked = 0
    for path in suites.bundled().values():
        for t in suites.load(path).trials:
            assert fits({"CPU": t.cpus_per_trial, "GPU": t.gpus_per_trial}, shape), (t.name, shape)
            if t.gpus_per_trial:
                per_gpu = round(1 / t.gpus_per_trial)
                assert per_gpu * t.cpus_per_trial <= shape["CPU"] / shape["GPU"], \
                    f"{t.name}: {per_gpu} trials share a GPU but a worker pod has {shape['CPU']:g} CPUs"
            checked += 1
    assert checked >= 59


# ---------------------------------------------------------------- results, secrets, exposure

def test_suite_writes_to_object_storage(job):
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:2] == ["raycnn", "run"]
    opts = dict(zip(args[3::2], args[4::2]))
    assert opts["--address"] == "auto"
    assert opts["--results-dir"].startswith("s3://")
    # The driver runs on the head: its --data-dir is a volume mounted there.
    head = pods(job)["head"]
    mounts = {m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert opts["--data-dir"] in mounts
    # Every pod that writes results (the head's driver, the workers' trials) has the credentials.
    for name, pod in pods(job).items():
        env = {e["name"] for e in pod["containers"][0].get("env", [])}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env, name


def test_no_secret_value_is_literal(job):
    envs = [e for pod in pods(job).values() for c in containers(pod) for e in c.get("env", [])]
    envs += cluster(job).get("autoscalerOptions", {}).get("env", [])
    secret_like = [e for e in envs if SECRET_NAME.search(e["name"])]
    assert secret_like, "the object-store credentials come through env"
    for e in secret_like:
        assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), e
    text = MANIFEST.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key id in the manifest"
    assert "RAY_AUTH_TOKEN" not in text, "the Ray token is KubeRay's Secret, not the manifest's"


def test_dashboard_stays_inside_the_cluster(job):
    head = cluster(job)["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert cluster(job)["authOptions"]["mode"] == "token"


def test_pods_run_as_non_root(job):
    for name, pod in pods(job).items():
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0, name
        for c in containers(pod):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (name, c["name"])
    # The autoscaler runs as a sidecar in the head pod, under its pod-level runAsNonRoot.
    assert cluster(job)["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] is False


def test_every_pod_runs_the_one_image(job):
    images = {c["image"] for pod in pods(job).values() for c in containers(pod)}
    assert len(images) == 1, images


# ---------------------------------------------------------------- the image

def instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def test_image_is_ray_of_constraints_with_the_project_pinned_by_it(job):
    steps = instructions(DOCKERFILE)
    base = [args for op, args in steps if op == "FROM"]
    assert len(base) == 1
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-(gpu|cu\d+)", base[0])
    assert m, base[0]
    assert m.group(1) == ray_version() == cluster(job)["rayVersion"]

    # Each `pip install` command of each RUN, as its words, by step number.
    pip = [(i, shlex.split(cmd)) for i, (op, args) in enumerate(steps) if op == "RUN"
           for cmd in args.split("&&") if "pip install" in cmd]
    assert pip
    for _, words in pip:
        assert ["-c", "constraints.txt"] == words[words.index("-c"):][:2], words
    project = [i for i, words in pip if "." in words]
    deps = [i for i, words in pip if "-r" in words]
    assert project and deps, "the dependencies, then the project itself"
    # Dependencies before the code, so a code change reuses the dependency layer.
    copies = [(i, [w for w in args.split() if not w.startswith("--")])
              for i, (op, args) in enumerate(steps) if op == "COPY"]
    copy_all = [i for i, words in copies if words[:-1] == ["."]]
    assert len(copy_all) == 1
    assert deps[0] < copy_all[0] < project[-1]
    early = [words[:-1] for i, words in copies if i < copy_all[0]]
    assert all(set(sources) <= {"pyproject.toml", "constraints.txt"} for sources in early), early


def test_image_runs_as_non_root_without_secrets():
    steps = instructions(DOCKERFILE)
    user = [args for op, args in steps if op == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0"), user
    for op, args in steps:
        if op in ("ENV", "ARG"):
            assert not SECRET_NAME.search(args.split("=")[0]), args
    ignored = {line.strip().strip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"data", "runs", ".venv", ".git"} <= ignored
