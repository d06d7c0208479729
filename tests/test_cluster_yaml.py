"""cluster.yaml checked offline with the Ray cluster launcher's own code, and its security
settings checked against the file, docs/cluster.md and Ray itself.

`ray up` (ray.autoscaler._private.commands.create_or_update_cluster -> _bootstrap_config)
loads the YAML with yaml.safe_load, then runs
  1. prepare_config: merge with ray/autoscaler/aws/defaults.yaml, prepend setup_commands to
     head/worker_setup_commands, check the docker section, fill per-type min/max_workers;
  2. the AWS provider's fillout_available_node_types_resources (boto3 DescribeInstanceTypes);
  3. validate_config: jsonschema against ray/autoscaler/ray-schema.json plus the cross-field
     checks (head_node_type among the node types, sum of min_workers <= max_workers);
  4. the AWS provider's bootstrap_config (IAM role, key pair, subnets, security group, AMI).
Steps 2 and 4 call AWS through boto3. The validation tests run 1 and 3 with boto3 made
unimportable, to prove nothing there reaches the network (step 2 only fills `resources` where a
node type leaves them out, and ours declares them). The security tests run the two parts of
step 4 that decide the security group and the head's IAM role, and Ray's AWS node provider
through a worker's life, with every AWS call answered here instead of by AWS.

Security, point by point:
- the dashboard (and its Jobs API, which runs any command) listens on the head's loopback only;
- Ray token authentication on every node and for every process there, the token from the
  user's own ~/.ray/auth_token, never from the repo (the slow test runs raycnn's driver against
  a Ray started that way);
- SSH only from the user's network, to the head only; all else only between the cluster's nodes;
- an IAM role for the head that covers exactly what Ray's node provider does, no more;
- torch, torchvision and Ray from constraints.txt on every node.
"""
from __future__ import annotations

import copy
import fnmatch
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
DOCS = REPO / "docs" / "cluster.md"
CONSTRAINTS = REPO / "constraints.txt"
TOKEN_PATH = "~/.ray/auth_token"     # where Ray looks for its token when no variable names one


@pytest.fixture
def offline(monkeypatch):
    """Make boto3/botocore unimportable: a code path that needs AWS fails instead of calling it."""
    for name in ("boto3", "botocore"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture
def raw() -> dict:
    with open(CLUSTER_YAML) as f:   # as `ray up` reads it
        return yaml.safe_load(f)


@pytest.fixture
def prepared(raw) -> dict:
    return ray_up_checks(raw)


def ray_up_checks(config: dict) -> dict:
    """The offline half of what `ray up` does to a config before launching anything."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def gpu_worker_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items()
            if name != config["head_node_type"] and t.get("resources", {}).get("GPU", 0) >= 1}


def head_and_worker(config: dict) -> tuple[dict, dict]:
    """The node_config of the head and of the (one) GPU worker type."""
    (worker,) = gpu_worker_types(config).values()
    return config["available_node_types"][config["head_node_type"]]["node_config"], worker["node_config"]


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
    # variant; test_every_node_installs_the_constraints compares it with constraints.txt.
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


# ---------------------------------------------------------------- the dashboard

def ray_start_options(commands: list[str]) -> tuple[list[str], dict]:
    """The arguments of the `ray start` in a start-command list, and the options `ray start`
    itself parses from them (its click command, not run)."""
    from ray.scripts.scripts import start
    for command in commands:
        for part in command.split(";"):
            words = shlex.split(part)
            if words[:2] == ["ray", "start"]:
                return words[2:], start.make_context("start", words[2:]).params
    raise AssertionError(f"no `ray start` in {commands}")


def test_dashboard_listens_on_the_heads_loopback_only(prepared):
    args, options = ray_start_options(prepared["head_start_ray_commands"])
    assert options["head"]
    # Said explicitly, not left to the default: the file is what a reviewer reads.
    assert "--dashboard-host=127.0.0.1" in args
    assert ipaddress.ip_address(options["dashboard_host"]).is_loopback
    assert options["include_dashboard"] is not False     # it runs, behind the tunnel
    _, worker_options = ray_start_options(prepared["worker_start_ray_commands"])
    assert ipaddress.ip_address(worker_options["dashboard_host"]).is_loopback
    assert "0.0.0.0" not in json.dumps(prepared)           # nothing is bound to every interface
    docs = DOCS.read_text()
    assert "ray dashboard cluster.yaml" in docs and "SSH tunnel" in docs


# ---------------------------------------------------------------- token authentication

def docker_env(config: dict) -> dict:
    """The variables `docker run` sets in a node's container from the config's run options."""
    env = {}
    for option in config["docker"].get("run_options", []):
        words = shlex.split(option)
        if words[0] in ("--env", "-e"):
            name, _, value = words[1].partition("=")
            env[name] = value
    return env


def test_token_authentication_on_every_node(prepared):
    docker = prepared["docker"]
    assert docker_env(prepared).get("RAY_AUTH_MODE") == "token"
    # Not undone per node type, nor by a start command.
    assert not any(k.endswith("run_options") and k != "run_options" for k in docker)
    assert not any("docker" in t for t in prepared["available_node_types"].values())
    for key in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands"):
        assert "RAY_AUTH_MODE" not in " ".join(prepared[key]), key

    # The token: the user's own token file, copied to the same place in every node's container,
    # where Ray reads it.
    assert prepared["file_mounts"][TOKEN_PATH] == TOKEN_PATH

    # The `docker run` Ray issues on each node (head and workers alike) sets the mode and
    # mounts the token at the container user's ~/.ray/auth_token.
    from ray.autoscaler._private.docker import docker_start_cmds
    home = "/home/ray"
    run = docker_start_cmds("ubuntu", docker["image"], prepared["file_mounts"], docker["container_name"],
                            docker["run_options"], prepared["cluster_name"], home, "docker")
    words = shlex.split(run)
    assert ["--env", "RAY_AUTH_MODE=token"] in [words[i:i + 2] for i in range(len(words))]
    assert any(w.endswith(":" + TOKEN_PATH.replace("~", home)) for w in words), run


def test_no_token_in_the_repository():
    """The token lives only in the user's environment: no value in the config or the docs, and
    no 64-hex-digit string (the form of `ray get-auth-token --generate`'s tokens) either."""
    for path in (CLUSTER_YAML, DOCS, REPO / "README.md"):
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_TOKEN\s*[:=]\s*\S", text), path
        assert not re.search(r"\b[0-9a-f]{64}\b", text), path


# ---------------------------------------------------------------- Ray's AWS bootstrap

class ReachedAws(Exception):
    """Raised where Ray's code would have called AWS."""


@pytest.fixture
def aws_bootstrap(monkeypatch):
    """Ray's AWS bootstrap module, with its two ways to AWS (boto3 clients and resources)
    raising ReachedAws."""
    from ray.autoscaler._private.aws import config as aws

    def reached(*args, **kwargs):
        raise ReachedAws(args[0])
    monkeypatch.setattr(aws, "_client", reached)
    monkeypatch.setattr(aws, "_resource", reached)
    return aws


def test_ssh_only_from_the_users_network(prepared, aws_bootstrap):
    """Every node type names its security groups, so `ray up` uses them and creates none: Ray's
    own group would admit SSH from 0.0.0.0/0. The head has the cluster group and the SSH group;
    the workers only the cluster group."""
    for name in prepared["available_node_types"]:     # without them Ray goes to make its own
        broken = copy.deepcopy(prepared)
        del broken["available_node_types"][name]["node_config"]["SecurityGroupIds"]
        with pytest.raises(ReachedAws):
            aws_bootstrap._configure_security_group(broken)
    bootstrapped = aws_bootstrap._configure_security_group(copy.deepcopy(prepared))
    assert bootstrapped["available_node_types"] == prepared["available_node_types"]

    head, worker = head_and_worker(prepared)
    cluster_group, ssh_group = head["SecurityGroupIds"]
    assert worker["SecurityGroupIds"] == [cluster_group] and ssh_group != cluster_group
    assert "security_group" not in prepared["provider"]       # would be ignored: misleading
    assert "0.0.0.0/0" not in json.dumps(prepared)

    # The groups as docs/cluster.md creates them: SSH from the user's CIDR into the SSH group,
    # everything into the cluster group only from its own members.
    commands = [" ".join(line.split()) for line in DOCS.read_text().replace("\\\n", " ").splitlines()]
    rules = [c.removeprefix("aws ec2 authorize-security-group-ingress ") for c in commands
             if c.startswith("aws ec2 authorize-security-group-ingress ")]
    assert sorted(rules) == sorted([
        '--region $REGION --group-id "$CLUSTER_SG" --protocol all --source-group "$CLUSTER_SG"',
        '--region $REGION --group-id "$SSH_SG" --protocol tcp --port 22 --cidr "$SSH_CIDR"']), rules
    assert 'echo "SecurityGroupIds: [$CLUSTER_SG, $SSH_SG]"' in commands      # in the head's order


def test_the_head_gets_our_role_not_rays_full_access_one(prepared, aws_bootstrap):
    """With an instance profile on the head Ray uses it; without, it goes to IAM to make one with
    AmazonEC2FullAccess and AmazonS3FullAccess."""
    broken = copy.deepcopy(prepared) | {"head_node": {}}
    head, worker = head_and_worker(broken)
    del head["IamInstanceProfile"]
    with pytest.raises(ReachedAws):
        aws_bootstrap._configure_iam_role(broken)
    bootstrapped = aws_bootstrap._configure_iam_role(copy.deepcopy(prepared) | {"head_node": {}})
    assert bootstrapped["head_node"] == {}                  # nothing of Ray's own added

    head, worker = head_and_worker(prepared)
    assert head["IamInstanceProfile"] == {"Name": "raycnn-head"}
    assert worker["IamInstanceProfile"] == {"Name": "raycnn-worker"}
    for node in (head, worker):
        assert node["MetadataOptions"]["HttpTokens"] == "required"    # credentials via IMDSv2 only


# ---------------------------------------------------------------- the head's IAM policy

def docs_policies() -> list[dict]:
    """The IAM policy documents written out in docs/cluster.md."""
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", DOCS.read_text(), re.S)]


def head_policy() -> list[dict]:
    """The statements of the head's policy (the one that lets it run instances)."""
    (policy,) = [p for p in docs_policies()
                 if any(s.get("Action") == "ec2:RunInstances" for s in p["Statement"])]
    return policy["Statement"]


def actions(statement: dict) -> list[str]:
    return [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]


def resources(statement: dict) -> list[str]:
    return [statement["Resource"]] if isinstance(statement["Resource"], str) else statement["Resource"]


def allowing(statements: list[dict], action: str, resource_type: str) -> list[dict]:
    """The statements that allow `action` on resources of `resource_type` (e.g. instance)."""
    return [s for s in statements if action in actions(s)
            and any(r == "*" or f":{resource_type}/" in r for r in resources(s))]


def worker_life(config: dict) -> list[tuple[str, dict]]:
    """Ray's AWS node provider, as the autoscaler on the head drives it, through one worker's
    life: launch, list, re-tag, terminate. Every EC2 call is recorded (operation, parameters)
    and answered here, before botocore signs or sends anything."""
    from botocore.awsrequest import AWSResponse
    from ray.autoscaler import tags
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    calls, instance = [], {"InstanceId": "i-0123456789abcdef0", "State": {"Name": "running"},
                           "PrivateIpAddress": "10.0.0.5", "Tags": []}

    def record(model, params, **kwargs):
        calls.append((model.name, copy.deepcopy(params)))

    def answer(model, params, **kwargs):
        if model.name == "RunInstances":
            instance["Tags"] = calls[-1][1]["TagSpecifications"][0]["Tags"]
            return AWSResponse("", 200, {}, None), {"Instances": [instance]}
        if model.name == "DescribeInstances":
            return AWSResponse("", 200, {}, None), {"Reservations": [{"Instances": [instance]}]}
        return AWSResponse("", 200, {}, None), {}

    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    for ec2 in (provider.ec2, provider.ec2_fail_fast):
        ec2.meta.client.meta.events.register("before-parameter-build.ec2", record)
        ec2.meta.client.meta.events.register("before-call.ec2", answer)
    name, worker = next(iter(gpu_worker_types(config).items()))
    # The worker's node_config as `ray up` leaves it in the head's copy: subnets filled in.
    node_config = copy.deepcopy(worker["node_config"]) | {"SubnetIds": ["subnet-0123456789abcdef0"]}
    provider.create_node(node_config, {tags.TAG_RAY_NODE_KIND: tags.NODE_KIND_WORKER,
                                       tags.TAG_RAY_USER_NODE_TYPE: name,
                                       tags.TAG_RAY_NODE_STATUS: tags.STATUS_UNINITIALIZED}, 1)
    (node,) = provider.non_terminated_nodes({tags.TAG_RAY_NODE_KIND: tags.NODE_KIND_WORKER})
    provider.set_node_tags(node, {tags.TAG_RAY_NODE_STATUS: tags.STATUS_UP_TO_DATE})
    provider.terminate_node(node)
    return calls


def test_the_heads_policy_is_what_rays_node_provider_needs(prepared):
    calls, policy = worker_life(prepared), head_policy()
    ops = {op for op, _ in calls}
    assert ops == {"RunInstances", "DescribeInstances", "CreateTags", "TerminateInstances"}, ops
    # Exactly those actions, plus resolving the AMI parameter and passing the worker role.
    granted = {a for s in policy for a in actions(s)}
    assert granted == {f"ec2:{op}" for op in ops} | {"ssm:GetParameters", "iam:PassRole"}
    assert prepared["provider"]["cache_stopped_nodes"] is False    # else Stop/StartInstances too
    for s in policy:
        assert s["Effect"] == "Allow" and not {"NotAction", "NotResource"} & set(s)
        assert resources(s) != ["*"] or actions(s) == ["ec2:DescribeInstances"], s   # no resource-level form
    region, cluster = prepared["provider"]["region"], prepared["cluster_name"]
    for s in policy:
        for arn in resources(s):
            assert arn == "*" or arn.split(":")[3] in (region, ""), arn   # "" : IAM is global

    (run,) = [p for op, p in calls if op == "RunInstances"]
    launched_tags = {t["Key"]: t["Value"] for t in run["TagSpecifications"][0]["Tags"]}
    (launch,) = allowing(policy, "ec2:RunInstances", "instance")
    assert launch["Condition"] == {"StringEquals": {"aws:RequestTag/ray-cluster-name": cluster,
                                                    "ec2:InstanceType": run["InstanceType"]}}
    assert launched_tags["ray-cluster-name"] == cluster
    (uses,) = [s for s in policy if s is not launch and "ec2:RunInstances" in actions(s)]
    groups = [r.rsplit("/", 1)[1] for r in resources(uses) if ":security-group/" in r]
    assert groups == run["SecurityGroupIds"]                     # the cluster group, no other
    (at_launch,) = [s for s in allowing(policy, "ec2:CreateTags", "instance") if "ec2:CreateAction" in json.dumps(s)]
    assert at_launch["Condition"] == {"StringEquals": {"ec2:CreateAction": "RunInstances"}}

    # Re-tagging and terminating: only instances that carry the cluster's tag, and the provider
    # only ever picks instances by that tag.
    (listed,) = [p for op, p in calls if op == "DescribeInstances"]
    assert {"Name": "tag:ray-cluster-name", "Values": [cluster]} in listed["Filters"]
    for op in ("CreateTags", "TerminateInstances"):
        conditions = [s.get("Condition") for s in allowing(policy, f"ec2:{op}", "instance") if s is not at_launch]
        assert conditions == [{"StringEquals": {"aws:ResourceTag/ray-cluster-name": cluster}}], op

    (ssm,) = [s for s in policy if "ssm:GetParameters" in actions(s)]
    assert run["ImageId"].startswith("resolve:ssm:")
    assert resources(ssm) == [f"arn:aws:ssm:{region}::parameter{run['ImageId'].removeprefix('resolve:ssm:')}"]
    (passrole,) = [s for s in policy if "iam:PassRole" in actions(s)]
    assert resources(passrole) == [f"arn:aws:iam::ACCOUNT_ID:role/{run['IamInstanceProfile']['Name']}"]
    assert passrole["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}


def test_the_docs_policies_grant_no_wildcards_and_no_s3_beyond_one_prefix():
    policies = docs_policies()
    assert len(policies) == 3          # who may take the roles, the head's, the optional data read
    for policy in policies:
        for s in policy["Statement"]:
            for a in actions(s):
                assert "*" not in a and "FullAccess" not in a, a
    (data,) = [p for p in policies if any(a.startswith("s3:") for s in p["Statement"] for a in actions(s))]
    assert {a for s in data["Statement"] for a in actions(s)} == {"s3:ListBucket", "s3:GetObject"}
    for s in data["Statement"]:
        assert all(r.startswith("arn:aws:s3:::BUCKET") for r in resources(s)), s


# ---------------------------------------------------------------- one set of versions

def test_every_node_installs_the_constraints(prepared):
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip()] = version.strip()
    assert set(pins) == {"torch", "torchvision", "ray"} and all(pins.values()), pins
    for key in ("head_setup_commands", "worker_setup_commands"):
        installs = [c for c in prepared[key] if "pip install" in c and "~/raycnn" in c]
        assert installs and all("-c ~/raycnn/constraints.txt" in c for c in installs), (key, installs)
    # The file travels with the repo (the rsync filter is .gitignore), and the image's Ray is the pin.
    patterns = (REPO / ".gitignore").read_text().split()
    assert not any(fnmatch.fnmatch("constraints.txt", p.strip("/")) for p in patterns)
    assert prepared["docker"]["image"].startswith(f"rayproject/ray:{pins['ray']}-")
    assert 'pip install -c constraints.txt "ray[default]" boto3' in DOCS.read_text()   # the launcher's Ray too


# ---------------------------------------------------------------- a token-authenticated Ray

@pytest.mark.slow
def test_raycnn_driver_joins_with_the_clusters_token_and_nothing_else(tmp_path, raw):
    """A one-node Ray started as cluster.yaml starts its nodes (its container environment, the
    token file where file_mounts puts it): raycnn's driver, in that environment, runs a trial;
    a driver holding another token is refused in one line."""
    from support import BASE_ENV, PY, free_ports, raycnn, stop_marked
    home = Path(tempfile.mkdtemp(prefix="rch-", dir="/tmp"))
    token = home / TOKEN_PATH.removeprefix("~/")
    token.parent.mkdir(mode=0o700)
    subprocess.run([str(Path(PY).with_name("ray")), "get-auth-token", "--generate"], check=True,
                   capture_output=True, env={**os.environ, "HOME": str(home)}, timeout=120)
    mark = f"RAYCNN_TEST_CLUSTER={uuid.uuid4().hex}"
    env = {**os.environ, **BASE_ENV, **docker_env(raw), "HOME": str(home), mark.split("=")[0]: mark.split("=")[1]}
    temp = Path(tempfile.mkdtemp(prefix="rca-", dir="/tmp"))
    port, agent = free_ports(2)
    try:
        out = subprocess.run([str(Path(PY).with_name("ray")), "start", "--head", f"--port={port}", "--num-cpus=1",
                              f"--temp-dir={temp}", "--include-dashboard=false", f"--dashboard-agent-listen-port={agent}",
                              "--node-ip-address=127.0.0.1", "--object-store-memory=200000000", "--disable-usage-stats"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        run = ("run", "mnist", "--synthetic", "--filter", "mnist/base/sgd/lr0.01", "--epochs", "1",
               "--max-train-samples", "256", "--address", f"127.0.0.1:{port}", "--results-dir", tmp_path)
        ok = raycnn(*run, "--name", "with-token", env=env)
        assert ok.returncode == 0, ok.stderr[-3000:]
        other = raycnn(*run, "--name", "other-token", env=env | {"RAY_AUTH_TOKEN": "f" * 64})
        assert other.returncode == 2, other.stderr[-3000:]
        (line,) = other.stderr.strip().splitlines()
        assert line.startswith(f"raycnn: error: cannot join the Ray cluster at 127.0.0.1:{port}: "), line
        assert not (tmp_path / "other-token").exists()
    finally:
        stop_marked(mark)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
