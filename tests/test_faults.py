"""Scale out and survive faults, through the `raycnn` command as a user runs it.

- several Ray nodes on one machine (`ray start` head + worker on loopback): trials land on both
  and their results in one run folder (slow);
- a trial's worker process SIGKILLed mid-epoch: the trial restarts from its last checkpoint
  and ends with each epoch exactly once (slow);
- the driver interrupted by SIGINT, its resume by SIGTERM: exit 130 and the resume command;
  the resumes run only what is unfinished, from checkpoints, losing and duplicating nothing (slow).

Every Ray started here lives under a private RAY_TMPDIR (or --temp-dir) and is stopped by the
process ids it started (tests/support.py): never `ray stop`, which would stop every Ray on the machine.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from raycnn import epoch_progress, results
from support import (BASE_ENV, FAULT_SUITE, PY, Background, cli_env, epochs_of, free_ports, marked, raycnn,
                     reported, stop_marked, wait_for)



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
