"""cluster.yaml checked offline with the Ray cluster launcher's own config validation.

`ray up` (ray.autoscaler._private.commands.create_or_update_cluster -> _bootstrap_config)
loads the YAML with yaml.safe_load, then runs
  1. prepare_config: merge with ray/autoscaler/aws/defaults.yaml, prepend setup_commands to
     head/worker_setup_commands, check the docker section, fill per-type min/max_workers;
  2. the AWS provider's fillout_available_node_types_resources (boto3 DescribeInstanceTypes);
  3. validate_config: jsonschema against ray/autoscaler/ray-schema.json plus the cross-field
     checks (head_node_type among the node types, sum of min_workers <= max_workers);
  4. the AWS provider's bootstrap_config (IAM role, key pair, subnets, security group, AMI).
Steps 2 and 4 call AWS through boto3, so this test runs 1 and 3 only, with boto3 made
unimportable to prove nothing here reaches the network. Step 2 is not needed for our config
anyway: it only fills `resources` where a node type leaves them out, and ours declares them.
"""
from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"


@pytest.fixture
def offline(monkeypatch):
    """Make boto3/botocore unimportable: a code path that needs AWS fails instead of calling it."""
    for name in ("boto3", "botocore"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture
def raw() -> dict:
    with open(CLUSTER_YAML) as f:   # as `ray up` reads it
        return yaml.safe_load(f)


def ray_up_checks(config: dict) -> dict:
    """The offline half of what `ray up` does to a config before launching anything."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def gpu_worker_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items()
            if name != config["head_node_type"] and t.get("resources", {}).get("GPU", 0) >= 1}


def test_cluster_yaml_passes_ray_validation_and_our_expectations(offline, raw):
    config = ray_up_checks(raw)

    # Provider: AWS, one region.
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"]

    # Head: CPU-only, no trials on it, never autoscaled.
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0
    assert head["max_workers"] == 0

    # An autoscaling single-GPU worker type that Ray knows has a GPU.
    gpu = gpu_worker_types(config)
    assert len(gpu) == 1, f"expected one GPU worker type, got {sorted(gpu)}"
    (name, worker), = gpu.items()
    assert worker["resources"]["GPU"] == 1
    assert worker["resources"]["CPU"] >= 1
    assert worker["min_workers"] == 0
    assert 1 <= worker["max_workers"] <= config["max_workers"]
    assert worker["node_config"]["InstanceType"].startswith(("g4dn.", "g5.", "g6.", "p3.", "p4d."))
    assert worker["node_config"]["ImageId"], "the GPU type needs an AMI with the NVIDIA driver"

    # A pinned Ray release (not :latest, which would drift from the launcher's Ray) in a CUDA
    # variant. Not compared with the installed Ray: CI's fresh venv may get a newer release.
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+-(gpu|cu\d+)", config["docker"]["image"])

    # The repo is copied to every node, without the local venv/data (.gitignore filter).
    assert config["file_mounts"].get("~/raycnn") == "."
    assert (REPO / "pyproject.toml").is_file()
    assert ".gitignore" in config["rsync_filter"]
    ignored = (REPO / ".gitignore").read_text().split()
    assert ".venv/" in ignored and "/data/" in ignored

    # Setup (merged by prepare_config into both head and worker lists) installs the project
    # and puts the datasets on the node itself.
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = config[key]
        install = [i for i, c in enumerate(cmds) if "pip install" in c and "-e ~/raycnn" in c]
        data = [i for i, c in enumerate(cmds) if "~/data" in c and "mnist" in c and "cifar10" in c]
        assert install and data, f"{key}: {cmds}"
        assert install[0] < data[0], "datasets are fetched through the installed project"
    # Ray's AWS defaults (a nightly Ray wheel) are replaced, not merged in.
    assert not any("ray-wheels" in c for c in config["worker_setup_commands"])
    assert any("boto3" in c for c in config["head_setup_commands"]), "the autoscaler needs boto3"

    # Ray 2.x start commands: an autoscaling head, workers joining it.
    head_start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_start

    # The shared results location is documented where users will look.
    text = CLUSTER_YAML.read_text()
    assert "--results-dir /mnt/efs/raycnn-results" in text      # results on a filesystem every node mounts


BAD = {
    "misspelled top-level key": (
        lambda c: c.__setitem__("max_worker", 8), jsonschema.ValidationError),
    "misspelled node-type key": (
        lambda c: c["available_node_types"]["ray.worker.gpu"].__setitem__("min_worker", 0),
        jsonschema.ValidationError),
    "GPU count as a string": (
        lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].__setitem__("GPU", "1"),
        jsonschema.ValidationError),
    "fractional GPU count": (
        lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].__setitem__("GPU", 0.5),
        jsonschema.ValidationError),
    # (a string setup_commands would crash prepare_config's list concatenation with a
    # TypeError before the schema is consulted, in `ray up` too; start commands are not merged)
    "start commands not a list": (
        lambda c: c.__setitem__("worker_start_ray_commands", "ray start --address=$RAY_HEAD_IP:6379"),
        jsonschema.ValidationError),
    "unknown docker option": (
        lambda c: c["docker"].__setitem__("gpus", "all"), jsonschema.ValidationError),
    "head_node_type not a node type": (
        lambda c: c.__setitem__("head_node_type", "ray.head.default"), ValueError),
    "min_workers above the global max": (
        lambda c: c["available_node_types"]["ray.worker.gpu"].__setitem__("min_workers", 9),
        ValueError),
}


@pytest.mark.parametrize("case", list(BAD))
def test_ray_validation_rejects_a_broken_copy(offline, raw, case):
    break_it, error = BAD[case]
    ray_up_checks(raw)                   # the original passes ...
    broken = copy.deepcopy(raw)
    break_it(broken)
    with pytest.raises(error):           # ... the broken copy does not
        ray_up_checks(broken)


def test_every_bundled_suite_packs_onto_the_gpu_worker(raw):
    """Each trial's CPU and GPU request fits the GPU worker type, and the trials that share one
    GPU (1 / gpus_per_trial of them) also get their CPUs on that node: no GPU share is left idle
    for want of cores."""
    from raycnn import suites
    from raycnn.cluster import fits, types_in
    (worker,) = gpu_worker_types(raw).values()
    shape = {k: float(v) for k, v in worker["resources"].items()}
    assert types_in(CLUSTER_YAML) == [shape]       # what placement sees before any worker exists
    checked = 0
    for name, path in suites.bundled().items():
        for t in suites.load(path).trials:
            assert fits({"CPU": t.cpus_per_trial, "GPU": t.gpus_per_trial}, shape), (t.name, shape)
            if t.gpus_per_trial:
                per_gpu = round(1 / t.gpus_per_trial)
                assert per_gpu * t.cpus_per_trial <= shape["CPU"] / shape["GPU"], \
                    f"{t.name}: {per_gpu} trials share a GPU but a worker has {shape['CPU']:g} CPUs"
            checked += 1
    assert checked >= 59
