"""Run folders in object storage on a cluster, and run folders that travel (slow): moto's S3
server on loopback (a real S3 API over HTTP, tests/support.py), two Ray nodes on this machine.

- a run into s3://bkt/runs on two nodes, one trial's worker killed mid-epoch: the trial goes on
  from its checkpoint in the bucket; `table` and `report` read the run there;
- an interrupted run folder copied from a disk into a bucket resumes there, and copied on out of
  the bucket onto another disk path resumes there too, to the same rows; a finished one copied
  out of the bucket reads the same;
- a results location one node cannot reach fails before any trial, in one line naming the node.

Every Ray started here is stopped by the process ids it started, the S3 server by its pid.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest

from raycnn import epoch_progress, results, storage
from support import (BASE_ENV, FAULT_SUITE, Background, cli_env, epochs_of, raycnn, raylet_of_second_node, reported,
                     s3_env, s3_server, two_nodes, wait_for)

pytestmark = pytest.mark.slow


def _listing(fs: pafs.FileSystem, prefix: str) -> list[str]:
    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
                  if i.type == pafs.FileType.File)


def _same_reading(a: str | Path, b: str | Path, env: dict, tmp: Path) -> None:
    """`table` prints the same for both run folders, and `report` writes the same page."""
    tables = [raycnn("table", run, "--format", "markdown", env=env) for run in (a, b)]
    assert [t.returncode for t in tables] == [0, 0] and tables[0].stdout == tables[1].stdout, tables[1].stderr
    pages = [raycnn("report", run, "-o", tmp / f"page{i}.html", env=env) for i, run in enumerate((a, b))]
    assert [p.returncode for p in pages] == [0, 0], pages[1].stderr
    assert (tmp / "page0.html").read_text() == (tmp / "page1.html").read_text()


# ---------------------------------------------------------------- a run in a bucket on two nodes

# FAULT_SUITE with ft/long's epochs 8 times longer: the kill below waits for its epoch 2 to be
# under way, seen through a listing and a read of the bucket per poll, and on an idle machine
# an epoch of 1,024 images can pass between two polls.
LONG_SUITE = FAULT_SUITE.replace('name = "long"\nepochs = 3\n', 'name = "long"\nepochs = 3\nmax_train_samples = 8192\n')
assert LONG_SUITE != FAULT_SUITE

def test_a_run_in_a_bucket_on_two_nodes_survives_a_killed_trial(tmp_path):
    suite = tmp_path / "ft.toml"
    suite.write_text(LONG_SUITE)
    with s3_server() as s3, two_nodes(head_env=s3.env, worker_env=s3.env, worker_cpus=1) as cluster:
        s3.admin().create_dir("bkt")
        env = {**os.environ, **BASE_ENV, **s3.env, "RAYCNN_PROGRESS_S": "0"}
        start = time.monotonic()
        run = Background("run", suite, "--synthetic", "--address", cluster.address, "--results-dir", "s3://bkt/runs",
                         "--name", "two", env=env, logs=tmp_path / "logs")
        progress = epoch_progress.folder(storage.Place(s3.admin(), "bkt/runs/two"))
        try:
            def long_epoch_1():
                return [r for folder, t in reported(cluster.temp).items() if "ft-long" in folder for r in t]
            pid = wait_for("ft/long's first epoch", long_epoch_1, timeout=900, proc=run, every=0.2)[0]["pid"]
            # Killed once epoch 2 is under way (its progress file, in the bucket): epoch 1's
            # checkpoint is then registered, and the trial must go on from it.
            wait_for("ft/long's epoch 2", lambda: any((epoch_progress.read(p) or {}).get("epoch") == 2
                                                      for p in progress.files("*ft-long*.json")),
                     timeout=300, proc=run, every=0.05)
            os.kill(pid, signal.SIGKILL)
            rc, _, err = run.wait()
        finally:
            run.stop()
        print(f"two nodes, results in the bucket: {time.monotonic() - start:.0f} s")
        assert rc == 0 and "Traceback" not in err, err[-3000:]
        assert any(l.startswith("raycnn: warning: ft/long failed") and "restarting" in l for l in err.splitlines()), err
        assert err.strip().splitlines()[-1] == "raycnn: done: results in s3://bkt/runs/two"
        trials, epochs = results.load_run(storage.Place(s3.admin(), "bkt/runs/two"))
        assert len(trials) == 3 and set(trials.status) == {"ok"}, trials[["name", "status", "error"]]
        # One CPU a node: the first two trials start together, so their first epochs ran on two
        # nodes (with a 2-CPU worker, Ray once put all three on one: ft/short ends in seconds). A
        # restarted or later trial may land on either node; its trial row names its last one.
        first = epochs[epochs.epoch == 1].set_index("name")["node"]
        assert first["ft/short"] != first["ft/long"], epochs[["name", "epoch", "node"]]
        assert epochs.node.nunique() == 2 and set(trials.node) <= set(epochs.node), trials[["name", "node"]]
        long = trials[trials.name == "ft/long"].iloc[0]
        assert long.failures == 1 and "restarted" in long.warning
        mine = epochs_of(epochs, "ft/long")
        assert list(mine.epoch) == [1, 2, 3] and list(mine.resumed) == [False, True, True]   # from epoch 1's checkpoint
        files = _listing(s3.admin(), "bkt/runs/two")
        for folder in ("000-ft-short-r0", "001-ft-long-r0", "002-ft-later-r0"):     # checkpoints of both nodes' trials
            assert any(f.startswith(f"bkt/runs/two/tune/experiment/{folder}/checkpoint_") and f.endswith("/state.pt")
                       for f in files), files
        assert not any("/progress/" in f or f.endswith(("driver.lock", ".write-test")) or "/.probe-" in f for f in files)

        # Out of the bucket onto a disk: it reads the same there.
        laptop = tmp_path / "laptop" / "two"
        pafs.copy_files("bkt/runs/two", str(laptop), source_filesystem=s3.admin())
        _same_reading("s3://bkt/runs/two", laptop, {**env, "RAY_TMPDIR": str(tmp_path)}, tmp_path)


# ---------------------------------------------------------------- run folders that travel

# What two trainings of the same epochs agree on (timings, nodes and provenance differ run to run).
TRAINED = ["name", "repeat", "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "resumed"]


def _drivers_files(folder: Path) -> dict[str, bytes]:
    """The files of a run folder that only a driver writes (the plan, the Parquet files, Tune's
    state and result.json files): not the progress files and checkpoints, which a trial of the
    interrupted run may still have written as its worker died after its driver."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part == "progress" or part.startswith("checkpoint_")
                                       for part in p.relative_to(folder).parts)}


def _went_on_exactly(run: str | storage.Place | Path, before: tuple[pd.DataFrame, pd.DataFrame]) -> pd.DataFrame:
    """The resumed run's epochs, checked against the interrupted run's: every trial done, every
    epoch exactly once, the finished trials' rows untouched, and the cut trial gone on from its
    checkpoint."""
    before_trials, before_epochs = before
    trials, epochs = results.load_run(run)
    assert len(trials) == 3 and set(trials.status) == {"ok"}, trials[["name", "status", "error"]]
    for _, t in trials.iterrows():
        assert list(epochs_of(epochs, t["name"]).epoch) == list(range(1, t.epochs + 1)), t["name"]
    for trial in before_trials[before_trials.status == "ok"].name:
        pd.testing.assert_frame_equal(epochs_of(epochs, trial), epochs_of(before_epochs, trial))
    going = before_trials[before_trials.status == "running"].iloc[0]
    cut = int(going.epochs_done)
    mine = epochs_of(epochs, going["name"])
    pd.testing.assert_frame_equal(mine.iloc[:cut], epochs_of(before_epochs, going["name"]))
    assert cut > 0 and mine.resumed.iloc[cut:].all()
    return epochs


def test_an_interrupted_run_travels_from_disk_to_a_bucket_and_on_to_a_laptop(interrupted, tmp_path, ray_tmp):
    """The interrupted run (conftest.py) copied from its disk into a bucket resumes there; the
    same interrupted folder copied on, out of the bucket onto another disk path, resumes there
    with no bucket running, and the two end with the same rows. Neither resume touches a folder
    it was copied from: no path inside a run folder decides anything."""
    suite, res, name, _, copy = interrupted
    before = results.load_run(copy / name)
    sources = {folder: _drivers_files(folder) for folder in (res / name, copy / name)}
    options = ["--synthetic", "--num-cpus", "1", "--max-concurrent", "1", "--name", name, "--resume"]
    laptop = tmp_path / "laptop" / "results"
    with s3_server() as s3:
        s3.admin().create_dir("bkt")
        env = cli_env(ray_tmp, **s3.env)
        pafs.copy_files(str(copy / name), f"bkt/moved/{name}", destination_filesystem=s3.admin())
        pafs.copy_files(f"bkt/moved/{name}", str(laptop / name), source_filesystem=s3.admin())
        out = raycnn("run", suite, "--results-dir", "s3://bkt/moved", *options, env=env, timeout=1800)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert out.stderr.strip().splitlines()[-1] == f"raycnn: done: results in s3://bkt/moved/{name}"
        in_bucket = _went_on_exactly(storage.Place(s3.admin(), f"bkt/moved/{name}"), before)
        fetched = tmp_path / "fetched" / name          # the finished run, out of the bucket: reads the same
        pafs.copy_files(f"bkt/moved/{name}", str(fetched), source_filesystem=s3.admin())
        _same_reading(f"s3://bkt/moved/{name}", fetched, env, tmp_path)
    out = raycnn("run", suite, "--results-dir", laptop, *options, env=cli_env(ray_tmp), timeout=1800)   # no bucket now
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    on_laptop = _went_on_exactly(laptop / name, before)
    pd.testing.assert_frame_equal(on_laptop[TRAINED], in_bucket[TRAINED])
    for folder, files in sources.items():
        now = _drivers_files(folder)
        assert now == files, [f for f in set(now) | set(files) if now.get(f) != files.get(f)]


# ---------------------------------------------------------------- a node that cannot reach the results

READ_ONLY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                                                       "Resource": "*"}]}
EVERYTHING = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def _users(s3) -> dict[str, dict]:
    """A user who may do anything and one who may only read, each as the environment a node or
    driver gets (moto checks signatures and policies once its first unauthenticated calls,
    these six, are spent)."""
    import boto3
    iam = boto3.client("iam", endpoint_url=s3.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                       aws_access_key_id="setup", aws_secret_access_key="setup")
    envs = {}
    for user, policy in (("writer", EVERYTHING), ("reader", READ_ONLY)):
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        envs[user] = s3_env(s3.port, key["AccessKeyId"], key["SecretAccessKey"])
    return envs


def test_a_results_location_one_node_cannot_reach_fails_before_any_trial(tmp_path):
    """What is simulated: both nodes run on this machine, so the second node is started in its
    own mount namespace (`unshare --mount`) with an empty tmpfs over the folder that holds the
    results: it sees another, empty folder at the same path, as a node without the shared mount
    would. And it gets the credentials of a user the bucket's policy lets read but not write, as
    a node with a narrower role would. The probe must find both before any trial starts."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare --mount` (root, or CAP_SYS_ADMIN) to hide a folder from one node")
    shared = tmp_path / "shared"
    shared.mkdir()
    suite = tmp_path / "ft.toml"
    suite.write_text(FAULT_SUITE)
    hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f"mount -t tmpfs none {shared} && exec \"$@\"", "sh"]
    with s3_server(INITIAL_NO_AUTH_ACTION_COUNT="6") as s3:
        users = _users(s3)
        with two_nodes(head_env=users["writer"], worker_env=users["reader"], worker_prefix=hide) as cluster:
            _, worker = raylet_of_second_node(cluster.mark)
            admin = pafs.S3FileSystem(endpoint_override=s3.env["AWS_ENDPOINT_URL"], region="us-east-1",
                                      access_key=users["writer"]["AWS_ACCESS_KEY_ID"],
                                      secret_key=users["writer"]["AWS_SECRET_ACCESS_KEY"], allow_bucket_creation=True)
            admin.create_dir("bkt")
            env = {**os.environ, **BASE_ENV, **users["writer"], "RAY_TMPDIR": str(tmp_path)}
            cases = {shared / "results": "cannot see it", "s3://bkt/runs": "cannot write there"}
            for where, problem in cases.items():
                out = raycnn("run", suite, "--synthetic", "--address", cluster.address, "--results-dir", where,
                             "--name", "x", env=env, timeout=600)
                assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-3000:]
                line = out.stderr.strip()
                print(line)
                assert line.startswith(f"raycnn: error: --results-dir {where}/x: node ") and worker[:8] in line, line
                assert problem in line and "every node must reach it" in line, line
            assert "ACCESS_DENIED" in line
            # Nothing left: no trial started, and the run folder was taken back.
            assert list(shared.iterdir()) == [] and _listing(admin, "bkt") == []


# ---------------------------------------------------------------- a search in a bucket

def test_a_search_in_a_bucket_reads_like_the_same_search_on_disk(tmp_path, ray_tmp):
    """`raycnn search` writes its plan, its samples' Tune experiment, their rows and the re-run
    into the bucket, and `table` reads the search there as it reads its copy on this disk."""
    from conftest import SEARCH_BUDGET, search_files
    suite, data = search_files(tmp_path)
    with s3_server() as s3:
        s3.admin().create_dir("bkt")
        env = cli_env(ray_tmp, **s3.env)
        done = raycnn("search", "tiny/*", "--suite", suite, "--data-dir", data, "--budget", SEARCH_BUDGET,
                      "--samples", "3", "--repeats", "1", "--results-dir", "s3://bkt/runs", "--name", "s",
                      "--num-cpus", "2", "--max-concurrent", "1", env=env, timeout=1500)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
        names = [p[len("bkt/runs/s/"):] for p in _listing(s3.admin(), "bkt/runs/s")]
        for made in ("search.json", "samples.parquet", "sample_epochs.parquet", "plan.json", "trials.parquet"):
            assert made in names, names
        assert any(n.startswith("tune/search-tiny-sgd/sample-001/") for n in names), names
        pafs.copy_files("bkt/runs/s", str(tmp_path / "copy" / "s"), source_filesystem=s3.admin())
        tables = [raycnn("table", run, "--format", "csv", env=env) for run in ("s3://bkt/runs/s", tmp_path / "copy" / "s")]
        assert [t.returncode for t in tables] == [0, 0] and tables[0].stdout == tables[1].stdout, tables[0].stderr
        assert "tiny/sgd" in tables[0].stdout and "lr=" in tables[0].stdout
